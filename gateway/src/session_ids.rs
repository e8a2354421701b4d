//! A core's session ids: the link and the pooler know a session by its id alone, so an id is
//! never given to a second session while the first lives. The core holds the allocator; each
//! session holds its claim (in its `SessionIo`) and frees the id by dropping it.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;

/// The ids in use on one core, and the next to try.
pub struct SessionIds {
    next: Cell<u32>,
    live: Rc<RefCell<HashSet<u32>>>,
}

/// A session id in use; freed when dropped.
pub struct SessionId {
    pub id: u32,
    live: Rc<RefCell<HashSet<u32>>>,
}

impl Drop for SessionId {
    fn drop(&mut self) {
        self.live.borrow_mut().remove(&self.id);
    }
}

impl Default for SessionIds {
    fn default() -> Self {
        SessionIds {
            next: Cell::new(1),
            live: Rc::new(RefCell::new(HashSet::new())),
        }
    }
}

impl SessionIds {
    /// An id in `1..=limit` no live session holds (ids wrap after `limit`); held until the
    /// returned claim is dropped. `None` when every id is taken.
    pub fn claim(&self, limit: u32) -> Option<SessionId> {
        let mut live = self.live.borrow_mut();
        if live.len() as u64 >= limit as u64 {
            return None;
        }
        // Ends: fewer live ids than ids, so a free one comes within `live.len() + 1` steps.
        loop {
            let id = self.next.get();
            self.next.set(if id >= limit { 1 } else { id + 1 });
            if live.insert(id) {
                return Some(SessionId {
                    id,
                    live: self.live.clone(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_wrap_and_skip_live_ones() {
        let ids = SessionIds::default();
        let a = ids.claim(3).unwrap();
        let b = ids.claim(3).unwrap();
        let c = ids.claim(3).unwrap();
        assert_eq!((a.id, b.id, c.id), (1, 2, 3));
        assert!(ids.claim(3).is_none(), "every id taken");
        drop(b);
        let d = ids.claim(3).unwrap();
        assert_eq!(d.id, 2, "wrapped past the live 1 to the freed 2");
        drop(a);
        assert_eq!(ids.claim(3).unwrap().id, 1);
    }
}
