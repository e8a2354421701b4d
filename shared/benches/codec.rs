//! The frame and message codecs every request crosses four times (client → gateway → pooler →
//! Postgres and back): link frame headers, message lengths, `Parse`/`Bind` bodies, and the
//! shared SQL lexer. Run with `cargo bench -p tidepool-shared --bench codec`; CI only builds it.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use shared::link::{parse_header, put_frame, up};
use shared::protocol::{frontend, typed_message_len};
use tidepool_shared as shared;

fn bench(c: &mut Criterion) {
    let payload = vec![b'x'; 96];
    c.bench_function("link/put_frame", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            put_frame(&mut out, up::MSGS, black_box(7), black_box(&payload));
        })
    });
    let mut frame = Vec::new();
    put_frame(&mut frame, up::MSGS, 7, &payload);
    c.bench_function("link/parse_header", |b| {
        b.iter(|| parse_header(black_box(&frame)))
    });

    // A pipelined extended-protocol request as drivers send it: Parse, Bind, Execute, Sync.
    let mut batch = Vec::new();
    let mut parse = vec![0u8];
    parse.extend_from_slice(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1\0");
    parse.extend_from_slice(&[0, 0]);
    put_msg(&mut batch, b'P', &parse);
    put_msg(&mut batch, b'B', b"\0\0\0\0\0\x01\0\0\0\x0548213\0\0");
    put_msg(&mut batch, b'E', b"\0\0\0\0\0");
    put_msg(&mut batch, b'S', b"");
    c.bench_function("protocol/walk_batch", |b| {
        b.iter(|| {
            let mut rest = black_box(&batch[..]);
            let mut n = 0;
            while let Ok(Some(len)) = typed_message_len(rest, 1 << 30) {
                rest = &rest[len..];
                n += 1;
            }
            n
        })
    });
    c.bench_function("protocol/parse_parse", |b| {
        b.iter(|| frontend::parse_parse(black_box(&batch[5..5 + parse.len()])).is_ok())
    });

    let sql = b"SELECT \"u\".\"id\", lower(\"u\".\"name\") FROM \"app_user\" AS u \
                WHERE u.id = $1 AND u.note <> 'it''s' -- trailing\n ORDER BY 1";
    c.bench_function("sql/lexer", |b| {
        b.iter(|| shared::sql::Lexer::new(black_box(sql)).count())
    });
}

fn put_msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

criterion_group!(benches, bench);
criterion_main!(benches);
