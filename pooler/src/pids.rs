//! The pid a client knows its session by (its `BackendKeyData`, chosen by the gateway) for the
//! backend pid that sent a notification (issue 11): a `NotificationResponse` carries the
//! sending backend's pid, and a client compares it with its own to tell its own notifications
//! from others'. Any backend may run a session's `NOTIFY`, so the pooler notes which session a
//! backend notifies for when it writes a statement the gateway flagged `NOTIFY`, and shows that
//! session's pid in the notifications the backend sends. Process-wide (a notification is fanned
//! out on every core); touched only by notifying statements and by notifications.

use parking_lot::Mutex;
use std::borrow::Cow;
use std::collections::HashMap;

static SHOWN: Mutex<Option<HashMap<i32, i32>>> = Mutex::new(None);

/// Backend `backend_pid` runs a notifying statement of the session clients know as `client_pid`.
pub fn notifying(backend_pid: i32, client_pid: i32) {
    SHOWN
        .lock()
        .get_or_insert_with(HashMap::new)
        .insert(backend_pid, client_pid);
}

/// The backend is gone (its pid may be reused by another process).
pub fn ended(backend_pid: i32) {
    if let Some(m) = SHOWN.lock().as_mut() {
        m.remove(&backend_pid);
    }
}

/// A `NotificationResponse` as clients see it: the sender's session pid instead of its backend's.
pub fn shown(msg: &[u8]) -> Cow<'_, [u8]> {
    let Some(raw) = msg.get(5..9) else {
        return Cow::Borrowed(msg);
    };
    let backend_pid = i32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let client_pid = SHOWN
        .lock()
        .as_ref()
        .and_then(|m| m.get(&backend_pid).copied());
    match client_pid {
        Some(pid) if pid != backend_pid => {
            let mut m = msg.to_vec();
            m[5..9].copy_from_slice(&pid.to_be_bytes());
            Cow::Owned(m)
        }
        _ => Cow::Borrowed(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_shows_the_session_pid_of_its_sender() {
        let mut msg = vec![b'A', 0, 0, 0, 14];
        msg.extend_from_slice(&9001i32.to_be_bytes());
        msg.extend_from_slice(b"ch\0x\0");
        assert_eq!(shown(&msg), &msg[..]);
        notifying(9001, 77);
        assert_eq!(&shown(&msg)[5..9], &77i32.to_be_bytes());
        assert_eq!(&shown(&msg)[9..], &msg[9..]);
        ended(9001);
        assert_eq!(shown(&msg), &msg[..]);
        assert_eq!(shown(b"A\0\0"), &b"A\0\0"[..]);
    }
}
