// node-postgres (`pg`) against a Postgres URL (argv[2]): the driver features that lean on the
// protocol.
//
// node-postgres sends a query without parameters as a simple Query, one with parameters through
// the unnamed statement (Parse/Bind/Describe/Execute/Sync), one with a `name` as a named
// statement it prepares once per connection; results are text unless `binary: true`.
//
// Prints "name: ok" per check and "name = value" for values compared with a run against Postgres
// itself (by gateway/tests/drivers.rs), then "node-postgres ok"; any failure exits non-zero.
// Usage: node pg_check.js URL [main]
'use strict'

const assert = require('node:assert/strict')
const crypto = require('node:crypto')
const { pipeline } = require('node:stream/promises')
const { Readable, Writable } = require('node:stream')
const pg = require('pg')
const Cursor = require('pg-cursor')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')

// Client#cancel, the driver's way to send a CancelRequest, reads the deprecated
// Client#activeQuery itself.
process.noDeprecation = true

const URL = process.argv[2]
const PART = process.argv[3] || 'main'
const SESSIONS = 100

function check(name, got, want) {
  try {
    assert.deepStrictEqual(got, want)
  } catch (e) {
    throw new Error(`${name}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`)
  }
  console.log(`${name}: ok`)
}

// A value not asserted here but compared between Postgres and Tidepool.
function record(name, value) {
  console.log(`${name} = ${JSON.stringify(value)}`)
}

function errorOf(e) {
  if (!e.code) throw e // not a server error: a failure of the check itself
  return [e.code, e.severity, e.message, e.detail || null]
}

async function expectError(name, promise) {
  try {
    await promise
  } catch (e) {
    record(name, errorOf(e))
    return e
  }
  throw new Error(`${name}: no error`)
}

async function connect(extra = {}) {
  const c = new pg.Client({ connectionString: URL, connectionTimeoutMillis: 10000, ...extra })
  await c.connect()
  return c
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function prepared(c) {
  // Unnamed statement: parameters, no name.
  for (let i = 0; i < 3; i++) {
    const r = await c.query('SELECT $1::int + $2::int AS sum', [i, 40])
    check(`unnamed ${i}`, r.rows, [{ sum: i + 40 }])
  }
  // Named statements, prepared once on this connection and executed again by name.
  for (const id of [1, 7, 50, 7]) {
    const r = await c.query({ name: 'nd_by_id', text: 'SELECT name FROM nd WHERE id = $1', values: [id] })
    check(`named ${id}`, r.rows, [{ name: `n${id}` }])
  }
  await c.query('SELECT pg_sleep(0.01)')
  const again = await c.query({ name: 'nd_by_id', text: 'SELECT name FROM nd WHERE id = $1', values: [2] })
  check('named again after other work', again.rows[0].name, 'n2')
  // Forced extended protocol without parameters; rows as arrays.
  const ext = await c.query({ text: 'SELECT 1 AS a, 2 AS b', queryMode: 'extended', rowMode: 'array' })
  check('extended without parameters', ext.rows, [[1, 2]])
  check('fields', ext.fields.map((f) => [f.name, f.dataTypeID]), [['a', 23], ['b', 23]])
  // Simple protocol, several statements in one Query.
  const multi = await c.query('SELECT 1 AS x; SELECT 2 AS y')
  check('multi-statement', multi.map((r) => r.rows), [[{ x: 1 }], [{ y: 2 }]])
  await expectError('unnamed parse error', c.query('SELECT nosuchcolumn FROM nd WHERE id = $1', [1]))
  await expectError('named parse error', c.query({ name: 'bad', text: 'SELECT nosuchcolumn FROM nd', values: [] }))
  await expectError('bind error', c.query('SELECT $1::int', ['not a number']))
  check('after errors', (await c.query('SELECT 3 AS v')).rows, [{ v: 3 }])
  // The same name on another connection with another text: names are per session.
  const other = await connect()
  const r = await other.query({ name: 'nd_by_id', text: 'SELECT $1::int * 100 AS v', values: [2] })
  check('same name, other session', r.rows, [{ v: 200 }])
  await other.end()
  const mine = await c.query({ name: 'nd_by_id', text: 'SELECT name FROM nd WHERE id = $1', values: [3] })
  check('same name, this session', mine.rows, [{ name: 'n3' }])
}

async function binary(c) {
  const r = await c.query({
    text:
      'SELECT $1::int2 AS i2, $2::int4 AS i4, $3::int8 AS i8, $4::float8 AS f8, $5::text AS t, ' +
      "$6::bool AS b, $7::numeric AS n, '2024-01-02 03:04:05.006+00'::timestamptz AS ts, " +
      "ARRAY[1, NULL, 3]::int4[] AS arr, ARRAY['a', 'b']::text[] AS tarr, NULL::int4 AS nul",
    values: [7, 123456, '1099511627776', 1.25, 'text ü', true, '12345.678901'],
    binary: true,
  })
  // pg-protocol reads every DataRow field as a UTF-8 string, so binary values with bytes that are
  // not UTF-8 come back mangled (int4 123456, float8, numeric, timestamps, int4[] here): what
  // counts for Tidepool is that they are mangled the same way, so those are recorded, the rest
  // asserted.
  const row = r.rows[0]
  check('binary values', [row.i2, row.i8, row.t, row.b, row.tarr, row.nul], [7, '1099511627776', 'text ü', true, ['a', 'b'], null])
  record('binary values as parsed', { ...row, ts: String(row.ts) })
  check('binary formats', r.fields.map((f) => f.format), Array(11).fill('binary'))
  const named = await c.query({ name: 'nd_bin', text: 'SELECT id, name FROM nd WHERE id <= $1 ORDER BY id', values: [3], binary: true })
  check('binary named', named.rows, [{ id: 1, name: 'n1' }, { id: 2, name: 'n2' }, { id: 3, name: 'n3' }])
  const bytes = await c.query({ text: 'SELECT $1::bytea AS b', values: [Buffer.from([0, 1, 255])] })
  check('bytea parameter', [...bytes.rows[0].b], [0, 1, 255])
}

async function transactions(c) {
  await c.query('BEGIN')
  await c.query('INSERT INTO nd VALUES ($1, $2)', [100, 'tx'])
  await c.query('SAVEPOINT sp')
  await expectError('unique violation', c.query('INSERT INTO nd VALUES ($1, $2)', [1, 'dup']))
  await expectError('in failed transaction', c.query('SELECT 1'))
  await c.query('ROLLBACK TO SAVEPOINT sp')
  check('savepoint kept outer work', (await c.query('SELECT name FROM nd WHERE id = $1', [100])).rows, [{ name: 'tx' }])
  await c.query('COMMIT')
  check('committed', (await c.query('SELECT count(*)::int AS n FROM nd WHERE id = 100')).rows, [{ n: 1 }])

  await c.query('BEGIN')
  await c.query('INSERT INTO nd VALUES (101, $1)', ['rolled back'])
  await expectError('division by zero', c.query('SELECT 1 / 0'))
  await expectError('named in failed transaction', c.query({ name: 'nd_by_id', text: 'SELECT name FROM nd WHERE id = $1', values: [1] }))
  const commit = await c.query('COMMIT') // Postgres answers the COMMIT of a failed transaction with ROLLBACK
  check('commit of failed transaction', commit.command, 'ROLLBACK')
  check('rolled back', (await c.query('SELECT count(*)::int AS n FROM nd WHERE id = 101')).rows, [{ n: 0 }])

  // An error in a multi-statement simple query rolls back its implicit transaction.
  await expectError('multi-statement error', c.query("INSERT INTO nd VALUES (102, 'implicit'); SELECT 1 / 0"))
  check('implicit transaction rolled back', (await c.query('SELECT count(*)::int AS n FROM nd WHERE id = 102')).rows, [{ n: 0 }])
  await c.query('BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY')
  check('serializable', (await c.query('SHOW transaction_isolation')).rows, [{ transaction_isolation: 'serializable' }])
  await expectError('read only', c.query('INSERT INTO nd VALUES (103, $1)', ['ro']))
  await c.query('ROLLBACK')
  check('after rollback', (await c.query('SELECT 4 AS v')).rows, [{ v: 4 }])
}

async function pipelined() {
  // pg's pipeline mode: queries are sent without waiting, each with its own Sync.
  const p = await connect({ pipeline: true })
  const results = await Promise.allSettled([
    p.query('SELECT $1::int AS v', [1]),
    p.query('SELECT 2 AS v'),
    p.query('SELECT 1 / 0 AS v'),
    p.query({ name: 'nd_pipe', text: 'SELECT $1::int * 3 AS v', values: [3] }),
    p.query({ name: 'nd_pipe', text: 'SELECT $1::int * 3 AS v', values: [4] }),
  ])
  check('pipeline', results.map((r) => (r.status === 'fulfilled' ? r.value.rows[0].v : r.reason.code)), [1, 2, '22012', 9, 12])
  await p.end()
}

async function copy(c) {
  const rows = []
  for (let i = 1000; i < 3000; i++) rows.push(`${i}\tcopied ${i}\n`)
  const inStream = c.query(copyFrom('COPY nd (id, name) FROM STDIN'))
  await pipeline(Readable.from(rows), inStream)
  check('copy in', inStream.rowCount, 2000)
  check('copy in rows', (await c.query('SELECT count(*)::int AS n FROM nd WHERE id >= 1000')).rows, [{ n: 2000 }])
  const chunks = []
  const outStream = c.query(copyTo('COPY (SELECT id, name FROM nd WHERE id BETWEEN 1000 AND 1004 ORDER BY id) TO STDOUT'))
  await pipeline(outStream, new Writable({ write(chunk, _enc, done) { chunks.push(chunk); done() } }))
  check('copy out', Buffer.concat(chunks).toString(), [1000, 1001, 1002, 1003, 1004].map((i) => `${i}\tcopied ${i}\n`).join(''))
  chunks.length = 0
  const big = c.query(copyTo('COPY (SELECT g, md5(g::text) FROM generate_series(1, 100000) g) TO STDOUT (FORMAT csv)'))
  await pipeline(big, new Writable({ write(chunk, _enc, done) { chunks.push(chunk); done() } }))
  const text = Buffer.concat(chunks).toString()
  check('copy out 100k', text.split('\n').length - 1, 100000)
  record('copy out 100k md5', crypto.createHash('md5').update(text).digest('hex'))
  // A failing COPY FROM: the error, and the session goes on.
  const dup = c.query(copyFrom('COPY nd (id, name) FROM STDIN'))
  try {
    await pipeline(Readable.from(['1\tdup\n']), dup)
    throw new Error('copy error: no error')
  } catch (e) {
    record('copy error', errorOf(e))
  }
  check('after copy error', (await c.query('SELECT 5 AS v')).rows, [{ v: 5 }])
}

async function listenNotify() {
  const a = await connect()
  const b = await connect()
  const got = []
  a.on('notification', (n) => got.push([n.channel, n.payload]))
  await a.query('LISTEN nd_news')
  await b.query("NOTIFY nd_news, 'first'")
  await b.query('BEGIN')
  await b.query("SELECT pg_notify('nd_news', $1)", ['in tx'])
  await b.query('COMMIT')
  await b.query('BEGIN')
  await b.query("NOTIFY nd_news, 'rolled back'")
  await b.query('ROLLBACK')
  await b.query("NOTIFY nd_news, 'last'")
  const deadline = Date.now() + 10000
  while (got.length < 3 && Date.now() < deadline) await sleep(20)
  check('notifications', got, [['nd_news', 'first'], ['nd_news', 'in tx'], ['nd_news', 'last']])
  check('listener queries', (await a.query('SELECT 6 AS v')).rows, [{ v: 6 }])
  await a.query('UNLISTEN nd_news')
  await b.query("NOTIFY nd_news, 'after unlisten'")
  await sleep(300)
  check('nothing after unlisten', got.length, 3)
  await a.end()
  await b.end()
}

// Postgres signals a cancelled backend twice (the process, then its process group: signal_child
// in postmaster.c); on a loaded machine the second signal can come late enough to cancel the
// session's next statement. Every check waits a moment after a cancel for that reason.
const CANCEL_SETTLE_MS = 300

// A query that is running, with a handler on it from the start (a rejection before the test
// looks at it is not an unhandled one) and the time it took to end.
function running(c, config, values) {
  const started = Date.now()
  const query = c.query(config, values)
  return query.then(
    (result) => ({ result, ms: Date.now() - started }),
    (error) => ({ error, ms: Date.now() - started })
  )
}

// Waits until the session's query shows as active in pg_stat_activity (on a loaded machine a
// fixed delay may cancel before the query has started, when Postgres ignores the cancel).
async function waitActive(monitor, text) {
  const deadline = Date.now() + 10000
  while (Date.now() < deadline) {
    const r = await monitor.query("SELECT count(*)::int AS n FROM pg_stat_activity WHERE state = 'active' AND query = $1", [text])
    if (r.rows[0].n > 0) return
    await sleep(20)
  }
  throw new Error(`${text} never showed as active`)
}

async function cancelled(name, outcome) {
  const { error, ms } = await outcome
  if (!error) throw new Error(`${name}: the query was not cancelled`)
  record(name, errorOf(error))
  return ms
}

async function cancel(c) {
  const monitor = await connect()
  // A CancelRequest on a connection of its own, with the session's BackendKeyData.
  const sleeping = running(c, 'SELECT pg_sleep(30)')
  await waitActive(monitor, 'SELECT pg_sleep(30)')
  new pg.Client({ connectionString: URL }).cancel(c, c.activeQuery)
  check('cancel within 10 s', (await cancelled('cancelled', sleeping)) < 10000, true)
  await sleep(CANCEL_SETTLE_MS)
  check('usable after cancel', (await c.query('SELECT 7 AS v')).rows, [{ v: 7 }])
  // Inside a transaction: the cancel aborts it.
  await c.query('BEGIN')
  await c.query("INSERT INTO nd VALUES (4000, 'before cancel')")
  const sleeping2 = running(c, 'SELECT pg_sleep($1)', [30])
  await waitActive(monitor, 'SELECT pg_sleep($1)')
  new pg.Client({ connectionString: URL }).cancel(c, c.activeQuery)
  check('cancel in transaction within 10 s', (await cancelled('cancelled in transaction', sleeping2)) < 10000, true)
  await sleep(CANCEL_SETTLE_MS)
  await expectError('transaction after cancel', c.query('SELECT 1'))
  await c.query('ROLLBACK')
  check('cancelled transaction rolled back', (await c.query('SELECT count(*)::int AS n FROM nd WHERE id = 4000')).rows, [{ n: 0 }])
  // statement_timeout: the server cancels itself.
  await c.query("SET statement_timeout = '200ms'")
  await expectError('statement timeout', c.query('SELECT pg_sleep(5)'))
  await c.query('RESET statement_timeout')
  await monitor.end()
}

async function largeResult(c) {
  const r = await c.query('SELECT g, md5(g::text) AS h FROM generate_series(1, 100000) g')
  check('large result rows', r.rowCount, 100000)
  check('large result sum', r.rows.reduce((s, row) => s + row.g, 0), (100000 * 100001) / 2)
  check('large result last', r.rows[99999], { g: 100000, h: crypto.createHash('md5').update('100000').digest('hex') })
  const rb = await c.query({ text: 'SELECT g FROM generate_series(1, 100000) g', binary: true, rowMode: 'array' })
  check('large binary result', rb.rows.reduce((s, row) => s + row[0], 0), (100000 * 100001) / 2)
  // A cursor: Execute with a row limit on the unnamed portal, again and again.
  const cursor = c.query(new Cursor('SELECT g FROM generate_series(1, $1::int) g', [100000]))
  let n = 0
  let total = 0
  for (;;) {
    const rows = await cursor.read(1000)
    if (rows.length === 0) break
    n += rows.length
    for (const row of rows) total += row.g
  }
  await cursor.close()
  check('cursor rows', [n, total], [100000, (100000 * 100001) / 2])
  const big = await c.query("SELECT repeat('x', 10000000) AS v")
  check('10 MB value', big.rows[0].v.length, 10000000)
}

async function manySessions() {
  const admin = await connect()
  await admin.query('DROP TABLE IF EXISTS nd_counter')
  await admin.query('CREATE TABLE nd_counter (id int PRIMARY KEY, n int)')
  await admin.query('INSERT INTO nd_counter VALUES (1, 0)')
  const session = async (i) => {
    const c = await connect({ application_name: `nd-${i}` })
    try {
      for (let round = 0; round < 5; round++) {
        // The same statement name in every session, another text in each third.
        const r = await c.query({
          name: 'nd_session',
          text: `SELECT $1::int * ${(i % 3) + 2} AS v, current_setting('application_name') AS app`,
          values: [i * 10 + round],
        })
        assert.deepStrictEqual(r.rows, [{ v: (i * 10 + round) * ((i % 3) + 2), app: `nd-${i}` }], `session ${i} round ${round}`)
        await c.query('BEGIN')
        await c.query('UPDATE nd_counter SET n = n + 1 WHERE id = $1', [1])
        await c.query('COMMIT')
      }
      return (await c.query('SHOW application_name')).rows[0].application_name
    } finally {
      await c.end()
    }
  }
  const names = await Promise.all(Array.from({ length: SESSIONS }, (_, i) => session(i)))
  check(`${SESSIONS} sessions kept their settings`, names, Array.from({ length: SESSIONS }, (_, i) => `nd-${i}`))
  check(`${SESSIONS} sessions counted`, (await admin.query('SELECT n FROM nd_counter')).rows, [{ n: SESSIONS * 5 }])
  // A pool, as applications use it.
  const pool = new pg.Pool({ connectionString: URL, max: 20 })
  const results = await Promise.all(Array.from({ length: 200 }, (_, i) => pool.query('SELECT $1::int + 1 AS v', [i])))
  check('pool', results.map((r) => r.rows[0].v), Array.from({ length: 200 }, (_, i) => i + 1))
  await pool.end()
  await admin.query('DROP TABLE nd_counter')
  await admin.end()
}

async function main() {
  if (PART !== 'main') throw new Error(`no part ${PART} here`)
  const c = await connect()
  const notices = []
  c.on('notice', (n) => notices.push([n.severity, n.code, n.message]))
  await c.query('DROP TABLE IF EXISTS nd')
  await c.query('CREATE TABLE nd (id int PRIMARY KEY, name text)')
  await c.query("INSERT INTO nd SELECT g, 'n' || g FROM generate_series(1, 50) g")

  await prepared(c)
  await binary(c)
  await transactions(c)
  await pipelined()
  await copy(c)
  await listenNotify()
  await cancel(c)
  await largeResult(c)
  await manySessions()

  await c.query("DO $$ BEGIN RAISE NOTICE 'hello node'; END $$")
  check('notice', notices.slice(-1), [['NOTICE', '00000', 'hello node']])
  await c.query("SET TimeZone = 'Asia/Tokyo'")
  check('setting kept', (await c.query('SHOW TimeZone')).rows, [{ TimeZone: 'Asia/Tokyo' }])
  await c.query('DROP TABLE nd')
  await c.end()
  console.log('node-postgres ok')
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
