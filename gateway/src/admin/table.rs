//! A result set as PgBouncer's console sends it: RowDescription, DataRows (text format),
//! CommandComplete `SHOW`, so psql prints a table.

use shared::protocol::put_cstr;

/// Column types the console uses (Postgres OIDs): psql aligns numbers right.
#[derive(Clone, Copy)]
pub enum Type {
    Text,
    Int8,
}

pub struct Table {
    columns: Vec<(&'static str, Type)>,
    rows: Vec<Vec<Option<String>>>,
}

/// A cell: `None` is SQL NULL.
pub enum Cell {
    Text(String),
    Int(i64),
    Null,
}

impl From<&str> for Cell {
    fn from(s: &str) -> Cell {
        Cell::Text(s.to_owned())
    }
}
impl From<String> for Cell {
    fn from(s: String) -> Cell {
        Cell::Text(s)
    }
}
impl From<u64> for Cell {
    fn from(n: u64) -> Cell {
        Cell::Int(n.min(i64::MAX as u64) as i64)
    }
}
impl From<usize> for Cell {
    fn from(n: usize) -> Cell {
        Cell::from(n as u64)
    }
}
impl From<i64> for Cell {
    fn from(n: i64) -> Cell {
        Cell::Int(n)
    }
}

impl Table {
    pub fn new(columns: &[(&'static str, Type)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// One row; as many cells as columns (a programming error otherwise, caught by tests).
    pub fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(
            cells
                .into_iter()
                .map(|c| match c {
                    Cell::Text(s) => Some(s),
                    Cell::Int(n) => Some(n.to_string()),
                    Cell::Null => None,
                })
                .collect(),
        );
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        body.extend_from_slice(&(self.columns.len() as i16).to_be_bytes());
        for (name, ty) in &self.columns {
            put_cstr(&mut body, name.as_bytes());
            body.extend_from_slice(&0i32.to_be_bytes()); // table
            body.extend_from_slice(&0i16.to_be_bytes()); // column
            let (oid, len): (i32, i16) = match ty {
                Type::Text => (25, -1),
                Type::Int8 => (20, 8),
            };
            body.extend_from_slice(&oid.to_be_bytes());
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(&(-1i32).to_be_bytes()); // typmod
            body.extend_from_slice(&0i16.to_be_bytes()); // text format
        }
        message(out, b'T', &body);
        for row in &self.rows {
            body.clear();
            body.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for cell in row {
                match cell {
                    Some(v) => {
                        body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        body.extend_from_slice(v.as_bytes());
                    }
                    None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
            message(out, b'D', &body);
        }
        command_complete(out, "SHOW");
    }
}

pub fn message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

pub fn command_complete(out: &mut Vec<u8>, tag: &str) {
    let mut b = Vec::new();
    put_cstr(&mut b, tag.as_bytes());
    message(out, b'C', &b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_row_description_rows_and_show() {
        let mut t = Table::new(&[("database", Type::Text), ("cl_active", Type::Int8)]);
        t.row(vec!["app".into(), 3u64.into()]);
        t.row(vec![Cell::Null, 0u64.into()]);
        let mut out = Vec::new();
        t.encode(&mut out);
        assert_eq!(out[0], b'T');
        let tlen = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        let d = &out[1 + tlen..];
        assert_eq!(d[0], b'D');
        assert!(out
            .windows(5)
            .any(|w| w == b"app\x00\x00" || w == b"\x00\x00\x00\x03a"));
        assert!(out.ends_with(b"C\x00\x00\x00\x09SHOW\x00"));
        // The NULL cell: length -1.
        assert!(out.windows(4).any(|w| w == [0xff, 0xff, 0xff, 0xff]));
    }
}
