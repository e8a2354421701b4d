// pgjdbc (Debian's libpostgresql-jdbc-java) against a Postgres URL: the driver features that
// lean on the protocol.
//
// pgjdbc runs a PreparedStatement through the unnamed statement until it has been executed
// `prepareThreshold` times (5), then through a named one (S_1, S_2, ... per connection), with
// binary results for the types it knows once named; `executeBatch` pipelines many
// Bind/Execute pairs before one Sync; `setFetchSize` in a transaction reads a portal in steps.
//
// Prints "name: ok" per check and "name = value" for values compared with a run against Postgres
// itself (by gateway/tests/drivers.rs), then "jdbc ok"; any failure exits non-zero.
// Usage: java -cp .:postgresql.jar JdbcCheck postgres://user:password@host:port/db [main|table-changed]

import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.net.URI;
import java.security.MessageDigest;
import java.sql.Array;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.time.LocalDate;
import java.time.LocalDateTime;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HexFormat;
import java.util.List;
import java.util.Objects;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;
import org.postgresql.util.PSQLException;
import org.postgresql.util.ServerErrorMessage;

public class JdbcCheck {
    static String jdbcUrl;
    static String user;
    static String password;

    static void check(String name, Object got, Object want) {
        if (!Objects.deepEquals(got, want)) {
            throw new AssertionError(name + ": got " + show(got) + ", want " + show(want));
        }
        System.out.println(name + ": ok");
    }

    static String show(Object o) {
        if (o instanceof Object[]) {
            return Arrays.deepToString((Object[]) o);
        }
        return String.valueOf(o);
    }

    /** A value not asserted here but compared between Postgres and Tidepool. */
    static void record(String name, Object value) {
        System.out.println(name + " = " + show(value));
    }

    /** SQLSTATE, severity, message and detail of a server error. */
    static String errorOf(SQLException e) {
        if (e instanceof PSQLException && ((PSQLException) e).getServerErrorMessage() != null) {
            ServerErrorMessage m = ((PSQLException) e).getServerErrorMessage();
            return "[" + m.getSQLState() + ", " + m.getSeverity() + ", " + m.getMessage() + ", " + m.getDetail() + "]";
        }
        throw new AssertionError("not a server error: " + e, e);
    }

    interface Body {
        void run() throws Exception;
    }

    static SQLException expectError(String name, Body body) throws Exception {
        try {
            body.run();
        } catch (SQLException e) {
            record(name, errorOf(e));
            return e;
        }
        throw new AssertionError(name + ": no error");
    }

    static Connection connect(String... options) throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", user);
        p.setProperty("password", password);
        p.setProperty("connectTimeout", "10");
        p.setProperty("socketTimeout", "120");
        for (int i = 0; i + 1 < options.length; i += 2) {
            p.setProperty(options[i], options[i + 1]);
        }
        return DriverManager.getConnection(jdbcUrl, p);
    }

    static Object one(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            if (!rs.next()) {
                throw new AssertionError("no row: " + sql);
            }
            return rs.getObject(1);
        }
    }

    static void prepared(Connection c) throws Exception {
        // Threshold 5: executions 1-4 on the unnamed statement, then on a named one (S_n).
        try (PreparedStatement ps = c.prepareStatement("SELECT name FROM jd WHERE id = ?")) {
            for (int i = 1; i <= 10; i++) {
                ps.setInt(1, i);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    check("threshold execution " + i, rs.getString(1), "n" + i);
                }
            }
            one(c, "SELECT pg_sleep(0.01)");
            ps.setInt(1, 42);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                check("named after other work", rs.getString(1), "n42");
            }
        }
        // Named from the first execution, and never named.
        for (String threshold : new String[] {"1", "0"}) {
            try (Connection d = connect("prepareThreshold", threshold);
                    PreparedStatement ps = d.prepareStatement("SELECT ?::int * 2")) {
                for (int i = 0; i < 3; i++) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        check("prepareThreshold " + threshold + " execution " + i, rs.getInt(1), i * 2);
                    }
                }
            }
        }
        // Simple protocol with the parameters inlined by the driver.
        try (Connection d = connect("preferQueryMode", "simple");
                PreparedStatement ps = d.prepareStatement("SELECT ?::text || '!'")) {
            ps.setString(1, "it's");
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                check("simple query mode", rs.getString(1), "it's!");
            }
        }
        expectError("parse error", () -> one(c, "SELECT nosuchcolumn FROM jd"));
        expectError("bind error", () -> {
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int")) {
                ps.setString(1, "not a number");
                ps.executeQuery().close();
            }
        });
        check("after errors", one(c, "SELECT 3"), 3);
    }

    /** A table changed under a named statement: pgjdbc re-prepares it (Close, then Parse under a
     * new name, same text) when Postgres says "cached plan must not change result type", and
     * retries once, in autocommit. */
    static void tableChanged(Connection c) throws Exception {
        try (Statement s = c.createStatement()) {
            s.execute("DROP TABLE IF EXISTS jd_shape");
            s.execute("CREATE TABLE jd_shape (a int)");
            s.execute("INSERT INTO jd_shape VALUES (1)");
        }
        try (PreparedStatement ps = c.prepareStatement("SELECT * FROM jd_shape")) {
            for (int i = 0; i < 6; i++) { // named from the 5th
                ps.executeQuery().close();
            }
            try (Statement s = c.createStatement()) {
                s.execute("ALTER TABLE jd_shape ADD COLUMN b text DEFAULT 'b'");
            }
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                check("changed table re-prepared", rs.getMetaData().getColumnCount(), 2);
            }
        }
        try (Statement s = c.createStatement()) {
            s.execute("DROP TABLE jd_shape");
        }
    }

    static void batches(Connection c) throws Exception {
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO jd VALUES (?, ?)")) {
            for (int i = 200; i < 300; i++) {
                ps.setInt(1, i);
                ps.setString(2, "b" + i);
                ps.addBatch();
            }
            int[] counts = ps.executeBatch();
            check("batch counts", counts.length, 100);
        }
        check("batch rows", one(c, "SELECT count(*) FROM jd WHERE id >= 200"), 100L);
        // An error in the middle of a batch (autocommit: the statements before it stay).
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO jd VALUES (?, ?)")) {
            for (int id : new int[] {300, 301, 1, 302}) {
                ps.setInt(1, id);
                ps.setString(2, "e" + id);
                ps.addBatch();
            }
            try {
                ps.executeBatch();
                throw new AssertionError("batch error: no error");
            } catch (BatchUpdateException e) {
                record("batch error", errorOf(e.getNextException()));
                record("batch error counts", Arrays.toString(e.getUpdateCounts()));
            }
        }
        record("rows after batch error", one(c, "SELECT count(*) FROM jd WHERE id >= 300"));
        try (Statement s = c.createStatement()) {
            s.execute("DELETE FROM jd WHERE id >= 300");
        }
    }

    static void binary(Connection c) throws Exception {
        // prepareThreshold -1: named and binary from the first execution.
        try (Connection d = connect("prepareThreshold", "-1");
                PreparedStatement ps = d.prepareStatement(
                        "SELECT ?::int2, ?::int4, ?::int8, ?::float8, ?::numeric, ?::text, ?::bool, ?::bytea, "
                                + "?::date, ?::timestamp, ?::timestamptz, ?::uuid, ARRAY[1, NULL, 3]::int4[], NULL::int8")) {
            UUID uuid = UUID.fromString("12345678-1234-5678-1234-567812345678");
            for (int round = 0; round < 2; round++) {
                ps.setShort(1, (short) 7);
                ps.setInt(2, 123456);
                ps.setLong(3, 1L << 40);
                ps.setDouble(4, 1.25);
                ps.setBigDecimal(5, new BigDecimal("12345.678901"));
                ps.setString(6, "text ü");
                ps.setBoolean(7, true);
                ps.setBytes(8, new byte[] {0, 1, (byte) 255});
                ps.setObject(9, LocalDate.of(2024, 2, 29));
                ps.setObject(10, LocalDateTime.of(2024, 1, 2, 3, 4, 5, 6000));
                ps.setObject(11, OffsetDateTime.of(2024, 1, 2, 3, 4, 5, 0, ZoneOffset.UTC));
                ps.setObject(12, uuid);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    Array arr = rs.getArray(13);
                    Object[] got = {
                        rs.getShort(1), rs.getInt(2), rs.getLong(3), rs.getDouble(4), rs.getBigDecimal(5),
                        rs.getString(6), rs.getBoolean(7), HexFormat.of().formatHex(rs.getBytes(8)),
                        rs.getObject(9, LocalDate.class), rs.getObject(10, LocalDateTime.class),
                        rs.getObject(11, OffsetDateTime.class).withOffsetSameInstant(ZoneOffset.UTC),
                        rs.getObject(12), Arrays.asList((Integer[]) arr.getArray()), rs.getObject(14),
                    };
                    Object[] want = {
                        (short) 7, 123456, 1L << 40, 1.25, new BigDecimal("12345.678901"), "text ü", true, "0001ff",
                        LocalDate.of(2024, 2, 29), LocalDateTime.of(2024, 1, 2, 3, 4, 5, 6000),
                        OffsetDateTime.of(2024, 1, 2, 3, 4, 5, 0, ZoneOffset.UTC), uuid, Arrays.asList(1, null, 3), null,
                    };
                    check("binary round trip " + round, got, want);
                }
            }
        }
    }

    static void transactions(Connection c) throws Exception {
        c.setAutoCommit(false);
        try (Statement s = c.createStatement()) {
            s.execute("INSERT INTO jd VALUES (100, 'tx')");
            Savepoint sp = c.setSavepoint("sp");
            expectError("unique violation", () -> s.execute("INSERT INTO jd VALUES (1, 'dup')"));
            expectError("in failed transaction", () -> s.execute("SELECT 1"));
            c.rollback(sp);
            check("savepoint kept outer work", one(c, "SELECT name FROM jd WHERE id = 100"), "tx");
            c.commit();
            s.execute("INSERT INTO jd VALUES (101, 'rolled back')");
            expectError("division by zero", () -> s.execute("SELECT 1 / 0"));
            c.rollback();
            check("rolled back", one(c, "SELECT count(*) FROM jd WHERE id = 101"), 0L);
            c.commit();
            // Read-only and serializable, set through the driver.
            c.setReadOnly(true);
            c.setTransactionIsolation(Connection.TRANSACTION_SERIALIZABLE);
            check("serializable", one(c, "SHOW transaction_isolation"), "serializable");
            expectError("read only", () -> s.execute("INSERT INTO jd VALUES (102, 'ro')"));
            c.rollback();
            c.setReadOnly(false);
            c.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
        }
        c.setAutoCommit(true);
        check("committed", one(c, "SELECT count(*) FROM jd WHERE id = 100"), 1L);
        // autosave=always: the driver wraps each statement in a savepoint, so an error does not
        // abort the transaction.
        try (Connection d = connect("autosave", "always")) {
            d.setAutoCommit(false);
            try (Statement s = d.createStatement()) {
                s.execute("INSERT INTO jd VALUES (103, 'autosave')");
                expectError("autosave error", () -> s.execute("INSERT INTO jd VALUES (1, 'dup')"));
                check("autosave goes on", one(d, "SELECT name FROM jd WHERE id = 103"), "autosave");
            }
            d.rollback();
        }
    }

    static void copy(Connection c) throws Exception {
        CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
        StringBuilder in = new StringBuilder();
        for (int i = 1000; i < 3000; i++) {
            in.append(i).append("\tcopied ").append(i).append('\n');
        }
        check("copy in", cm.copyIn("COPY jd (id, name) FROM STDIN", new StringReader(in.toString())), 2000L);
        StringWriter out = new StringWriter();
        check("copy out count", cm.copyOut("COPY (SELECT id, name FROM jd WHERE id BETWEEN 1000 AND 1004 ORDER BY id) TO STDOUT", out), 5L);
        check("copy out", out.toString(), "1000\tcopied 1000\n1001\tcopied 1001\n1002\tcopied 1002\n1003\tcopied 1003\n1004\tcopied 1004\n");
        StringWriter big = new StringWriter();
        check("copy out 100k", cm.copyOut("COPY (SELECT g, md5(g::text) FROM generate_series(1, 100000) g) TO STDOUT (FORMAT csv)", big), 100000L);
        record("copy out 100k md5", HexFormat.of().formatHex(MessageDigest.getInstance("MD5").digest(big.toString().getBytes("UTF-8"))));
        expectError("copy error", () -> cm.copyIn("COPY jd (id, name) FROM STDIN", new StringReader("1\tdup\n")));
        check("after copy error", one(c, "SELECT 5"), 5);
        // COPY inside a transaction, rolled back.
        c.setAutoCommit(false);
        cm.copyIn("COPY jd (id, name) FROM STDIN", new StringReader("5000\tin tx\n"));
        c.rollback();
        c.setAutoCommit(true);
        check("copy rolled back", one(c, "SELECT count(*) FROM jd WHERE id = 5000"), 0L);
    }

    static void listenNotify() throws Exception {
        try (Connection a = connect(); Connection b = connect()) {
            PGConnection pa = a.unwrap(PGConnection.class);
            try (Statement sa = a.createStatement(); Statement sb = b.createStatement()) {
                sa.execute("LISTEN jd_news");
                sb.execute("NOTIFY jd_news, 'first'");
                b.setAutoCommit(false);
                sb.execute("SELECT pg_notify('jd_news', 'in tx')");
                b.commit();
                sb.execute("NOTIFY jd_news, 'rolled back'");
                b.rollback();
                b.setAutoCommit(true);
                sb.execute("NOTIFY jd_news, 'last'");
                List<String> got = new ArrayList<>();
                long deadline = System.currentTimeMillis() + 10000;
                while (got.size() < 3 && System.currentTimeMillis() < deadline) {
                    PGNotification[] ns = pa.getNotifications(500);
                    if (ns != null) {
                        for (PGNotification n : ns) {
                            got.add(n.getName() + ":" + n.getParameter());
                        }
                    }
                }
                check("notifications", got, List.of("jd_news:first", "jd_news:in tx", "jd_news:last"));
                check("listener queries", one(a, "SELECT 6"), 6);
                sa.execute("UNLISTEN jd_news");
                sb.execute("NOTIFY jd_news, 'after unlisten'");
                Thread.sleep(300);
                PGNotification[] late = pa.getNotifications(300);
                check("nothing after unlisten", late == null ? 0 : late.length, 0);
            }
        }
    }

    /** Postgres signals a cancelled backend twice (the process, then its process group:
     * signal_child in postmaster.c); on a loaded machine the second signal can come late enough to
     * cancel the session's next statement. Every check waits a moment after a cancel for that. */
    static final long CANCEL_SETTLE_MS = 300;

    static void cancel(Connection c) throws Exception {
        ExecutorService canceller = Executors.newSingleThreadExecutor();
        try (Statement s = c.createStatement()) {
            long started = System.nanoTime();
            Future<?> later = canceller.submit(() -> {
                Thread.sleep(500);
                s.cancel(); // a CancelRequest on a connection of its own
                return null;
            });
            expectError("cancelled", () -> s.execute("SELECT pg_sleep(30)"));
            later.get(10, TimeUnit.SECONDS);
            check("cancel within 10 s", System.nanoTime() - started < 10_000_000_000L, true);
            Thread.sleep(CANCEL_SETTLE_MS);
            check("usable after cancel", one(c, "SELECT 7"), 7);
            // setQueryTimeout: the driver cancels from a timer.
            s.setQueryTimeout(1);
            expectError("query timeout", () -> s.execute("SELECT pg_sleep(30)"));
            s.setQueryTimeout(0);
            Thread.sleep(CANCEL_SETTLE_MS);
            // Inside a transaction the cancel aborts it.
            c.setAutoCommit(false);
            s.execute("INSERT INTO jd VALUES (4000, 'before cancel')");
            later = canceller.submit(() -> {
                Thread.sleep(500);
                s.cancel();
                return null;
            });
            expectError("cancelled in transaction", () -> s.execute("SELECT pg_sleep(30)"));
            later.get(10, TimeUnit.SECONDS);
            Thread.sleep(CANCEL_SETTLE_MS);
            expectError("transaction after cancel", () -> s.execute("SELECT 1"));
            c.rollback();
            c.setAutoCommit(true);
            check("cancelled transaction rolled back", one(c, "SELECT count(*) FROM jd WHERE id = 4000"), 0L);
            s.execute("SET statement_timeout = '200ms'");
            expectError("statement timeout", () -> s.execute("SELECT pg_sleep(5)"));
            s.execute("RESET statement_timeout");
        } finally {
            canceller.shutdownNow();
        }
    }

    static void largeResult(Connection c) throws Exception {
        long n = 0;
        long sum = 0;
        String last = null;
        try (Statement s = c.createStatement();
                ResultSet rs = s.executeQuery("SELECT g, md5(g::text) FROM generate_series(1, 100000) g")) {
            while (rs.next()) {
                n++;
                sum += rs.getInt(1);
                last = rs.getString(2);
            }
        }
        check("large result", new long[] {n, sum}, new long[] {100000, 100000L * 100001 / 2});
        String want = HexFormat.of().formatHex(MessageDigest.getInstance("MD5").digest("100000".getBytes("UTF-8")));
        check("large result last", last, want);
        // A fetch size in a transaction: Execute with a row limit, portal suspended, again.
        c.setAutoCommit(false);
        n = 0;
        sum = 0;
        try (PreparedStatement ps = c.prepareStatement("SELECT g FROM generate_series(1, ?) g")) {
            ps.setFetchSize(1000);
            ps.setInt(1, 100000);
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    n++;
                    sum += rs.getInt(1);
                }
            }
        }
        c.commit();
        c.setAutoCommit(true);
        check("fetch size result", new long[] {n, sum}, new long[] {100000, 100000L * 100001 / 2});
        check("10 MB value", ((String) one(c, "SELECT repeat('x', 10000000)")).length(), 10000000);
    }

    static void manySessions(int sessions) throws Exception {
        try (Connection admin = connect(); Statement s = admin.createStatement()) {
            s.execute("DROP TABLE IF EXISTS jd_counter");
            s.execute("CREATE TABLE jd_counter (id int PRIMARY KEY, n int)");
            s.execute("INSERT INTO jd_counter VALUES (1, 0)");
            ExecutorService pool = Executors.newFixedThreadPool(sessions);
            try {
                List<Future<String>> results = new ArrayList<>();
                for (int i = 0; i < sessions; i++) {
                    final int id = i;
                    results.add(pool.submit(() -> session(id)));
                }
                List<String> names = new ArrayList<>();
                List<String> want = new ArrayList<>();
                for (int i = 0; i < sessions; i++) {
                    names.add(results.get(i).get(180, TimeUnit.SECONDS));
                    want.add("jd-" + i);
                }
                check(sessions + " sessions kept their settings", names, want);
            } finally {
                pool.shutdownNow();
            }
            check(sessions + " sessions counted", one(admin, "SELECT n FROM jd_counter"), sessions * 5);
            s.execute("DROP TABLE jd_counter");
        }
    }

    static String session(int i) throws Exception {
        try (Connection c = connect("ApplicationName", "jd-" + i, "prepareThreshold", "2")) {
            // Every session names its statements S_1, S_2, ...: the same names, other texts.
            int factor = i % 3 + 2;
            try (PreparedStatement ps = c.prepareStatement(
                            "SELECT ?::int * " + factor + ", current_setting('application_name')");
                    PreparedStatement up = c.prepareStatement("UPDATE jd_counter SET n = n + 1 WHERE id = ?")) {
                for (int round = 0; round < 5; round++) {
                    ps.setInt(1, i * 10 + round);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        if (rs.getInt(1) != (i * 10 + round) * factor || !rs.getString(2).equals("jd-" + i)) {
                            throw new AssertionError("session " + i + " round " + round + ": " + rs.getInt(1) + " " + rs.getString(2));
                        }
                    }
                    c.setAutoCommit(false);
                    up.setInt(1, 1);
                    up.executeUpdate();
                    c.commit();
                    c.setAutoCommit(true);
                }
            }
            return (String) one(c, "SHOW application_name");
        }
    }

    public static void main(String[] args) throws Exception {
        URI uri = new URI(args[0]);
        String[] userInfo = uri.getUserInfo().split(":", 2);
        user = userInfo[0];
        password = userInfo[1];
        jdbcUrl = "jdbc:postgresql://" + uri.getHost() + ":" + uri.getPort() + uri.getPath();
        String part = args.length > 1 ? args[1] : "main";
        int sessions = 100;
        if (part.equals("table-changed")) {
            try (Connection c = connect()) {
                tableChanged(c);
            }
            System.out.println("jdbc ok");
            return;
        }

        try (Connection c = connect()) {
            List<String> notices = new ArrayList<>();
            try (Statement s = c.createStatement()) {
                s.execute("DROP TABLE IF EXISTS jd");
                s.execute("CREATE TABLE jd (id int PRIMARY KEY, name text)");
                s.execute("INSERT INTO jd SELECT g, 'n' || g FROM generate_series(1, 50) g");
            }
            prepared(c);
            batches(c);
            binary(c);
            transactions(c);
            copy(c);
            listenNotify();
            cancel(c);
            largeResult(c);
            manySessions(sessions);
            try (Statement s = c.createStatement()) {
                s.execute("DO $$ BEGIN RAISE NOTICE 'hello jdbc'; END $$");
                check("notice", s.getWarnings() == null ? null : s.getWarnings().getMessage(), "hello jdbc");
                s.execute("SET TimeZone = 'Asia/Tokyo'");
                check("setting kept", one(c, "SHOW TimeZone"), "Asia/Tokyo");
                s.execute("DROP TABLE jd");
            }
        }
        System.out.println("jdbc ok");
    }
}
