//! The classifier's cost per statement, on the statements pgbench and ORMs send: what the
//! gateway pays on every `Query` and `Parse` before anything reaches a pooler. Run with
//! `cargo bench -p tidepool-gateway --bench classify`; CI only builds it.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tidepool_gateway::{calls, classify, statement_names};

/// (name, text): a read, pgbench's writes, an ORM's qualified read, a function call.
const STATEMENTS: &[(&str, &str)] = &[
    (
        "select",
        "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
    ),
    (
        "update",
        "UPDATE pgbench_accounts SET abalance = abalance + -4211 WHERE aid = 48213;",
    ),
    (
        "insert",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
         VALUES (7, 1, 48213, -4211, CURRENT_TIMESTAMP);",
    ),
    ("begin", "BEGIN;"),
    (
        "orm",
        "SELECT \"app_user\".\"id\", \"app_user\".\"email\", lower(\"app_user\".\"name\") \
         FROM \"app_user\" WHERE (\"app_user\".\"id\" = $1 AND \"app_user\".\"active\") \
         ORDER BY \"app_user\".\"created\" DESC LIMIT 21",
    ),
    ("set", "SET application_name = 'bench'"),
];

fn bench(c: &mut Criterion) {
    for (name, sql) in STATEMENTS {
        let sql = sql.as_bytes();
        c.bench_function(&format!("fast/{name}"), |b| {
            b.iter(|| classify::fast(black_box(sql)))
        });
        c.bench_function(&format!("only_builtin_calls/{name}"), |b| {
            b.iter(|| calls::only_builtin_calls(black_box(sql)))
        });
        c.bench_function(&format!("sequence_state/{name}"), |b| {
            b.iter(|| classify::sequence_state(black_box(sql)))
        });
        c.bench_function(&format!("statement_names/{name}"), |b| {
            b.iter(|| statement_names::find(black_box(sql)))
        });
    }
    // The grammar, which the fast path exists to avoid (cached by text in the gateway).
    let (_, update) = STATEMENTS[1];
    c.bench_function("full/update", |b| {
        b.iter(|| classify::full(black_box(update)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
