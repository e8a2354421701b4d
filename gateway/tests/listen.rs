//! LISTEN/NOTIFY without pinning (issue #4): the pooler's shared listener fans notifications out
//! to every listening session, so more sessions listen than there are backends, and LISTEN,
//! UNLISTEN, UNLISTEN * and NOTIFY keep Postgres's transaction semantics. Real Postgres 15,
//! tokio-postgres clients through the gateway (and a second gateway process).

use std::future::Future;
use std::time::Duration;

use testkit::{Endpoint, PgCluster, Tidepool, TidepoolOpts, ALICE, APP_DB, BOB};
use tokio_postgres::{AsyncMessage, Client, NoTls};

type Notifications = tokio::sync::mpsc::UnboundedReceiver<(String, String, i32)>;

async fn bounded<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("test exceeded {limit:?}"))
}

fn start(pool_size: usize) -> (PgCluster, Tidepool) {
    let pg = PgCluster::start();
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(pool_size));
    (pg, tp)
}

/// A session whose notifications (channel, payload, sender pid) go to a channel.
async fn session_as(ep: &Endpoint, who: (&str, &str)) -> (Client, Notifications) {
    let (client, mut connection) = ep
        .pg_config(who.0, who.1, APP_DB)
        .connect(NoTls)
        .await
        .expect("login through the gateway");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = msg {
                let _ = tx.send((
                    n.channel().to_string(),
                    n.payload().to_string(),
                    n.process_id(),
                ));
            }
        }
    });
    (client, rx)
}

async fn session(ep: &Endpoint) -> (Client, Notifications) {
    session_as(ep, ALICE).await
}

/// The next notification, or `None` after 5 s.
async fn recv(rx: &mut Notifications) -> Option<(String, String)> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .ok()
        .flatten()
        .map(|(c, p, _)| (c, p))
}

/// Nothing arrives within a while (the positive cases around each check show delivery works).
async fn silent(rx: &mut Notifications, what: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Ok(n) = rx.try_recv() {
        panic!("{what}: got {n:?}");
    }
}

fn pair(c: &str, p: &str) -> Option<(String, String)> {
    Some((c.to_string(), p.to_string()))
}

async fn channels(c: &Client) -> Vec<String> {
    c.query("SELECT pg_listening_channels() AS c ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// Ten sessions listen on two backends: each hears every notification once, Postgres never
/// sees more than two backends of alice, and a session that leaves stops being served.
#[tokio::test]
async fn ten_listeners_on_two_backends() {
    let (_pg, tp) = start(2);
    let watch = tp.watch_backends(ALICE.0);
    bounded(Duration::from_secs(90), async {
        let ep = tp.endpoint();
        let mut listeners = Vec::new();
        for i in 0..10 {
            let (c, rx) = session(&ep).await;
            if i % 2 == 0 {
                c.batch_execute("LISTEN fan").await.unwrap();
            } else {
                // Inside a transaction: takes effect at COMMIT.
                c.batch_execute("BEGIN; LISTEN fan; SELECT 1; COMMIT")
                    .await
                    .unwrap();
            }
            listeners.push((c, rx));
        }
        let (notifier, _) = session(&ep).await;
        notifier
            .batch_execute("NOTIFY fan, 'one'; SELECT pg_notify('fan', 'two')")
            .await
            .unwrap();
        for (i, (_, rx)) in listeners.iter_mut().enumerate() {
            assert_eq!(recv(rx).await, pair("fan", "one"), "listener {i}");
            assert_eq!(recv(rx).await, pair("fan", "two"), "listener {i}");
        }
        // Every listener still runs queries, on the same two backends.
        for (c, _) in &listeners {
            let n: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
            assert_eq!(n, 7);
        }
        for (i, (_, rx)) in listeners.iter_mut().enumerate() {
            silent(rx, &format!("listener {i} got a duplicate")).await;
        }
        // Half of them leave: the rest still hear, once each.
        let mut kept = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            if i % 2 == 0 {
                kept.push(l);
            }
        }
        notifier.batch_execute("NOTIFY fan, 'three'").await.unwrap();
        for (i, (_, rx)) in kept.iter_mut().enumerate() {
            assert_eq!(recv(rx).await, pair("fan", "three"), "listener {i}");
            silent(rx, "a duplicate after others left").await;
        }
    })
    .await;
    let (max, samples) = watch.stop();
    assert!(samples > 0);
    assert!(
        max <= 2,
        "alice had {max} backends with pool size 2\n{}",
        tp.logs()
    );
}

/// LISTEN, UNLISTEN and UNLISTEN * inside and outside transactions, rollback, NOTIFY at commit,
/// payloads, the session's own notifications, DISCARD ALL, pg_listening_channels().
#[tokio::test]
async fn transaction_semantics() {
    let (_pg, tp) = start(2);
    bounded(Duration::from_secs(90), async {
        let ep = tp.endpoint();
        let (a, mut a_rx) = session(&ep).await;
        let (b, mut b_rx) = session(&ep).await;

        // A LISTEN rolled back never takes effect.
        a.batch_execute("BEGIN; LISTEN rb; ROLLBACK").await.unwrap();
        assert!(channels(&a).await.is_empty());
        // An error in an implicit transaction rolls the LISTEN back too.
        let err = a.batch_execute("LISTEN rb; SELECT 1/0").await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("22012"));
        b.batch_execute("NOTIFY rb, 'x'").await.unwrap();
        silent(&mut a_rx, "LISTEN was rolled back").await;

        // LISTEN inside a transaction takes effect at COMMIT.
        a.batch_execute("BEGIN").await.unwrap();
        a.batch_execute("LISTEN t").await.unwrap();
        b.batch_execute("NOTIFY t, 'before commit'").await.unwrap();
        a.batch_execute("COMMIT").await.unwrap();
        silent(&mut a_rx, "notified before the LISTEN committed").await;
        assert_eq!(channels(&a).await, vec!["t".to_string()]);
        b.batch_execute("NOTIFY t, 'after commit'").await.unwrap();
        assert_eq!(recv(&mut a_rx).await, pair("t", "after commit"));

        // A NOTIFY in a transaction arrives at commit; none on rollback; duplicates folded.
        b.batch_execute("BEGIN; NOTIFY t, 'tx'; NOTIFY t, 'tx'")
            .await
            .unwrap();
        silent(&mut a_rx, "a NOTIFY arrived before its commit").await;
        b.batch_execute("COMMIT").await.unwrap();
        assert_eq!(recv(&mut a_rx).await, pair("t", "tx"));
        b.batch_execute("BEGIN; NOTIFY t, 'rolled back'; ROLLBACK")
            .await
            .unwrap();
        silent(&mut a_rx, "a rolled back NOTIFY arrived").await;

        // A listener in a transaction hears notifications when its transaction ends.
        a.batch_execute("BEGIN; SELECT 1").await.unwrap();
        b.batch_execute("NOTIFY t, 'while a is in a transaction'")
            .await
            .unwrap();
        silent(&mut a_rx, "delivered inside a transaction").await;
        a.batch_execute("COMMIT").await.unwrap();
        assert_eq!(
            recv(&mut a_rx).await,
            pair("t", "while a is in a transaction")
        );

        // Payloads: empty, quotes, unicode, long; quoted channel names.
        let long = "p".repeat(7000);
        b.execute("SELECT pg_notify('t', $1)", &[&""])
            .await
            .unwrap();
        b.execute("SELECT pg_notify('t', $1)", &[&"it's \"quoted\" — ünï"])
            .await
            .unwrap();
        b.execute("SELECT pg_notify('t', $1)", &[&long])
            .await
            .unwrap();
        assert_eq!(recv(&mut a_rx).await, pair("t", ""));
        assert_eq!(recv(&mut a_rx).await, pair("t", "it's \"quoted\" — ünï"));
        assert_eq!(recv(&mut a_rx).await, pair("t", &long));
        a.batch_execute("LISTEN \"Mixed Case\"").await.unwrap();
        b.batch_execute("NOTIFY \"Mixed Case\", 'm'; NOTIFY mixed, 'lower'")
            .await
            .unwrap();
        assert_eq!(recv(&mut a_rx).await, pair("Mixed Case", "m"));
        assert_eq!(
            channels(&a).await,
            vec!["Mixed Case".to_string(), "t".to_string()]
        );

        // A session hears its own notifications.
        a.batch_execute("NOTIFY t, 'self'").await.unwrap();
        assert_eq!(recv(&mut a_rx).await, pair("t", "self"));

        // UNLISTEN one, rolled back; then for real.
        a.batch_execute("BEGIN; UNLISTEN t; ROLLBACK")
            .await
            .unwrap();
        b.batch_execute("NOTIFY t, 'still'").await.unwrap();
        assert_eq!(recv(&mut a_rx).await, pair("t", "still"));
        a.batch_execute("UNLISTEN t").await.unwrap();
        b.batch_execute("NOTIFY t, 'unheard'; NOTIFY \"Mixed Case\", 'heard'")
            .await
            .unwrap();
        assert_eq!(recv(&mut a_rx).await, pair("Mixed Case", "heard"));
        silent(&mut a_rx, "after UNLISTEN t").await;

        // UNLISTEN *.
        a.batch_execute("LISTEN u1; LISTEN u2").await.unwrap();
        a.batch_execute("UNLISTEN *").await.unwrap();
        assert!(channels(&a).await.is_empty());
        b.batch_execute("NOTIFY u1; NOTIFY u2; NOTIFY \"Mixed Case\"")
            .await
            .unwrap();
        silent(&mut a_rx, "after UNLISTEN *").await;

        // DISCARD ALL unlistens.
        a.batch_execute("LISTEN d").await.unwrap();
        b.batch_execute("NOTIFY d, 'before discard'").await.unwrap();
        assert_eq!(recv(&mut a_rx).await, pair("d", "before discard"));
        a.batch_execute("DISCARD ALL").await.unwrap();
        b.batch_execute("NOTIFY d, 'after discard'").await.unwrap();
        silent(&mut a_rx, "after DISCARD ALL").await;

        // b never listened: it heard nothing of all this.
        silent(&mut b_rx, "b does not listen").await;
    })
    .await;
}

/// Notifications go only to sessions listening on that channel in that database, whoever
/// their role, and carry the notifying backend's pid.
#[tokio::test]
async fn only_the_listening_sessions_hear() {
    let (pg, tp) = start(2);
    pg.psql_admin("CREATE DATABASE other OWNER alice");
    bounded(Duration::from_secs(90), async {
        let ep = tp.endpoint();
        let (a, mut a_rx) = session(&ep).await;
        let (c, mut c_rx) = session(&ep).await;
        let (bob, mut bob_rx) = session_as(&ep, BOB).await;
        let (other_db, mut other_rx) = {
            let (client, mut connection) = ep
                .pg_config(ALICE.0, ALICE.1, "other")
                .connect(NoTls)
                .await
                .unwrap();
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(Ok(msg)) =
                    std::future::poll_fn(|cx| connection.poll_message(cx)).await
                {
                    if let AsyncMessage::Notification(n) = msg {
                        let _ = tx.send((
                            n.channel().to_string(),
                            n.payload().to_string(),
                            n.process_id(),
                        ));
                    }
                }
            });
            (client, rx)
        };
        a.batch_execute("LISTEN mine").await.unwrap();
        c.batch_execute("LISTEN theirs").await.unwrap();
        bob.batch_execute("LISTEN mine").await.unwrap();
        other_db.batch_execute("LISTEN mine").await.unwrap();
        let sender_pid: i32 = c
            .query_one(
                "SELECT pg_backend_pid() FROM (SELECT pg_notify('mine', 'from c')) n",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let got = tokio::time::timeout(Duration::from_secs(5), a_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (got.0.as_str(), got.1.as_str(), got.2),
            ("mine", "from c", sender_pid),
            "the pid is the notifying backend's"
        );
        assert_eq!(recv(&mut bob_rx).await, pair("mine", "from c"));
        silent(&mut c_rx, "c listens on another channel").await;
        silent(&mut other_rx, "another database").await;
        other_db
            .batch_execute("NOTIFY mine, 'other db'")
            .await
            .unwrap();
        assert_eq!(recv(&mut other_rx).await, pair("mine", "other db"));
        silent(&mut a_rx, "a notification of another database").await;
    })
    .await;
}

/// Sessions of two gateway processes on one pooler all hear a notification once.
#[tokio::test]
async fn listeners_on_two_gateways() {
    let (_pg, tp) = start(2);
    let second = tp.start_gateway_on(testkit::free_port());
    bounded(Duration::from_secs(90), async {
        let mut all = Vec::new();
        for ep in [tp.endpoint(), second.endpoint()] {
            for _ in 0..3 {
                let (c, rx) = session(&ep).await;
                c.batch_execute("LISTEN across").await.unwrap();
                all.push((c, rx));
            }
        }
        let (n, _) = session(&second.endpoint()).await;
        n.batch_execute("NOTIFY across, 'both'").await.unwrap();
        for (i, (_, rx)) in all.iter_mut().enumerate() {
            assert_eq!(recv(rx).await, pair("across", "both"), "session {i}");
        }
        for (i, (_, rx)) in all.iter_mut().enumerate() {
            silent(rx, &format!("session {i} got a duplicate")).await;
        }
    })
    .await;
}

/// The listening connection dies (terminated by an administrator): the pooler re-establishes
/// it and listens again, and the sessions keep being served without doing anything.
#[tokio::test]
async fn a_lost_listening_connection_comes_back() {
    let (pg, tp) = start(2);
    bounded(Duration::from_secs(90), async {
        let ep = tp.endpoint();
        let (a, mut a_rx) = session(&ep).await;
        let (b, _) = session(&ep).await;
        a.batch_execute("LISTEN back").await.unwrap();
        b.batch_execute("NOTIFY back, 'before'").await.unwrap();
        assert_eq!(recv(&mut a_rx).await, pair("back", "before"));
        let killed = pg.psql_admin(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE usename = 'postgres' AND datname = 'app' AND pid <> pg_backend_pid()",
        );
        assert!(
            killed.trim() != "0",
            "no listening connection found: {killed}"
        );
        // Notifications sent before it listens again are lost; it must be back within seconds.
        let mut back = false;
        for i in 0..40 {
            b.batch_execute(&format!("NOTIFY back, 'probe {i}'"))
                .await
                .unwrap();
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(250), a_rx.recv()).await
            {
                back = true;
                break;
            }
        }
        assert!(
            back,
            "no notification after the listener was terminated\n{}",
            tp.logs()
        );
        while a_rx.try_recv().is_ok() {}
        b.batch_execute("NOTIFY back, 'after'").await.unwrap();
        assert_eq!(recv(&mut a_rx).await, pair("back", "after"));
        // The session itself still works, and hears its own notifications.
        a.batch_execute("NOTIFY back, 'self'").await.unwrap();
        assert_eq!(recv(&mut a_rx).await, pair("back", "self"));
    })
    .await;
}

/// Many notifications while the listener is in a long transaction arrive at its commit, in
/// order; and while it pipelines queries, notifications interleave with results without
/// disturbing them, each delivered once.
#[tokio::test]
async fn busy_listeners_get_everything_once_in_order() {
    let (_pg, tp) = start(2);
    bounded(Duration::from_secs(120), async {
        let ep = tp.endpoint();
        let (a, mut a_rx) = session(&ep).await;
        let (b, _) = session(&ep).await;
        a.batch_execute("LISTEN busy").await.unwrap();
        a.batch_execute("BEGIN; SELECT 1").await.unwrap();
        for i in 0..300 {
            b.execute("SELECT pg_notify('busy', $1)", &[&i.to_string()])
                .await
                .unwrap();
        }
        silent(&mut a_rx, "delivered inside a transaction").await;
        a.batch_execute("COMMIT").await.unwrap();
        for i in 0..300 {
            assert_eq!(recv(&mut a_rx).await, pair("busy", &i.to_string()));
        }
        // Pipelined queries on a (tokio-postgres sends them without waiting) while b notifies.
        let stmt = a.prepare("SELECT $1::int + 1").await.unwrap();
        let queries = async {
            let futs: Vec<_> = (0..200i32)
                .map(|i| {
                    let a = &a;
                    let stmt = &stmt;
                    async move {
                        let v: i32 = a.query_one(stmt, &[&i]).await.unwrap().get(0);
                        assert_eq!(v, i + 1);
                    }
                })
                .collect();
            futures_util::future::join_all(futs).await;
        };
        let notes = async {
            for i in 0..200 {
                b.batch_execute(&format!("NOTIFY busy, 'p{i}'"))
                    .await
                    .unwrap();
            }
        };
        tokio::join!(queries, notes);
        for i in 0..200 {
            assert_eq!(recv(&mut a_rx).await, pair("busy", &format!("p{i}")));
        }
        silent(&mut a_rx, "a duplicate").await;
    })
    .await;
}

/// Listener connections Postgres sees for database `db` (the pooler names them).
fn listener_connections(pg: &PgCluster, db: &str) -> i64 {
    pg.psql_admin(&format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'tidepool listener' AND datname = '{db}'"
    ))
    .trim()
    .parse()
    .expect("a count")
}

/// Exactly one listener connection for `db`, allowing a moment for one the pooler closed (after
/// nobody listened for a while) to disappear from `pg_stat_activity`.
async fn one_listener_connection(pg: &PgCluster, db: &str, what: &str) {
    let mut n = 0;
    for _ in 0..50 {
        n = listener_connections(pg, db);
        if n == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: {n} listener connections for {db}, want 1");
}

/// The pooler cores that logged serving listening sessions (listen.rs logs it once per core and
/// database).
fn cores_with_listeners(pg: &PgCluster, tp: &Tidepool) -> Vec<usize> {
    let log = pg.dir().join(format!("pooler-{}.log", tp.gateway_port()));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut cores: Vec<usize> = text
        .lines()
        .filter(|l| l.contains("sessions on this core listen"))
        .filter_map(|l| {
            let rest = &l[l.find(" core=")? + 6..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    cores.sort();
    cores.dedup();
    cores
}

/// Sessions listening on both cores of a `--cores 2` pooler share ONE listening connection to
/// the database (on one owner core; the other core's sessions are served over the core mesh):
/// all of them hear a notification once, and their own first, and it stays one as sessions leave
/// and come back.
#[tokio::test]
async fn one_listening_connection_for_all_cores() {
    // 16 links per gateway core: the kernel spreads links over the two pooler cores by hash, so
    // both cores get sessions (all 32 links on one core: probability 2^-31); checked below too.
    let opts = TidepoolOpts::default()
        .pool_size(4)
        .gateway_arg("--links-per-core")
        .gateway_arg("16");
    assert_eq!(opts.cores, 2);
    let pg = PgCluster::start();
    let tp = Tidepool::start(&pg, opts);
    bounded(Duration::from_secs(120), async {
        let ep = tp.endpoint();
        let (notifier, _) = session(&ep).await;
        for round in 0..2 {
            let mut listeners = Vec::new();
            for i in 0..32 {
                let (c, mut rx) = session(&ep).await;
                // Its own notification arrives before the NOTIFY completes, as directly, on
                // either core: in round 0 from a channel it already listens on (the barrier's
                // answer follows the notification over the mesh), in round 1 from a channel
                // LISTENed in the same transaction (the listener listened ahead).
                if round == 0 {
                    c.batch_execute(&format!("LISTEN everyone; LISTEN own{i}"))
                        .await
                        .unwrap();
                    c.batch_execute(&format!("NOTIFY own{i}, 'me'"))
                        .await
                        .unwrap();
                } else {
                    c.batch_execute(&format!(
                        "LISTEN everyone; LISTEN own{i}; NOTIFY own{i}, 'me'"
                    ))
                    .await
                    .unwrap();
                }
                match rx.try_recv() {
                    Ok((ch, p, _)) => assert_eq!((ch, p), (format!("own{i}"), "me".to_string())),
                    Err(e) => panic!("round {round}, session {i}: own notification not first: {e}"),
                }
                listeners.push((c, rx));
            }
            assert_eq!(
                cores_with_listeners(&pg, &tp),
                vec![0, 1],
                "sessions did not listen on both pooler cores\n{}",
                tp.logs()
            );
            one_listener_connection(&pg, APP_DB, &format!("round {round}")).await;
            notifier
                .batch_execute(&format!("NOTIFY everyone, 'round {round}'"))
                .await
                .unwrap();
            for (i, (_, rx)) in listeners.iter_mut().enumerate() {
                assert_eq!(
                    recv(rx).await,
                    pair("everyone", &format!("round {round}")),
                    "round {round}, listener {i}"
                );
            }
            // Half leave: the others still hear, once each.
            let leaving: Vec<_> = listeners.drain(..16).collect();
            drop(leaving);
            notifier
                .batch_execute(&format!("NOTIFY everyone, 'half {round}'"))
                .await
                .unwrap();
            for (i, (_, rx)) in listeners.iter_mut().enumerate() {
                assert_eq!(
                    recv(rx).await,
                    pair("everyone", &format!("half {round}")),
                    "round {round}, remaining listener {i}"
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            for (i, (_, rx)) in listeners.iter_mut().enumerate() {
                if let Ok(n) = rx.try_recv() {
                    panic!("round {round}, listener {i} got a duplicate: {n:?}");
                }
            }
            one_listener_connection(&pg, APP_DB, &format!("round {round}")).await;
            // Everyone leaves; the next round listens again from nothing.
        }
    })
    .await;
}

/// A database whose sessions listened can still be dropped through the gateway once they left:
/// the pooler closes the listening connection on it (nobody listens), as it closes idle
/// backends. While a session still listens, the drop is refused, as directly.
#[tokio::test]
async fn a_database_that_had_listeners_can_be_dropped() {
    let (pg, tp) = start(2);
    pg.psql_admin("CREATE DATABASE listened OWNER alice");
    bounded(Duration::from_secs(90), async {
        let ep = tp.endpoint();
        let (admin, _) = session(&ep).await;
        let connect = || async {
            let (client, connection) = ep
                .pg_config(ALICE.0, ALICE.1, "listened")
                .connect(NoTls)
                .await
                .unwrap();
            let task = tokio::spawn(async move {
                let _ = connection.await;
            });
            (client, task)
        };
        let (l, l_task) = connect().await;
        l.batch_execute("LISTEN gone; NOTIFY gone").await.unwrap();
        assert_eq!(listener_connections(&pg, "listened"), 1);
        // Still listening: refused (55006), the listening session is really connected.
        let err = admin
            .batch_execute("DROP DATABASE listened")
            .await
            .unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("55006"), "{err}");
        drop(l);
        let _ = l_task.await;
        // The session has left; the pooler may take a moment to see it (each refusal takes
        // Postgres 5 s of waiting for the other connections to go).
        let mut dropped = None;
        for _ in 0..3 {
            match admin.batch_execute("DROP DATABASE listened").await {
                Ok(()) => {
                    dropped = Some(());
                    break;
                }
                Err(e) if e.code().map(|c| c.code()) == Some("55006") => {}
                Err(e) => panic!("DROP DATABASE: {e}"),
            }
        }
        assert!(
            dropped.is_some(),
            "DROP DATABASE still refused after the listener left\n{}",
            tp.logs()
        );
        assert_eq!(listener_connections(&pg, "listened"), 0);
    })
    .await;
}

/// A trigger's `pg_notify` is the session's own notification although nothing in the statement
/// says so: as directly, it reaches the client before the statement's `ReadyForQuery` (found by
/// django-pgpubsub's own suite: up to 5 of its 40 tests saw one notification fewer).
#[tokio::test]
async fn a_triggers_notification_comes_before_the_statement_completes() {
    let (pg, tp) = start(2);
    pg.psql_admin_db(
        APP_DB,
        "CREATE TABLE ev (id serial PRIMARY KEY, v text);\n\
         CREATE FUNCTION ev_notify() RETURNS trigger LANGUAGE plpgsql AS\n\
           $$ BEGIN PERFORM pg_notify('ev', NEW.id::text); RETURN NEW; END $$;\n\
         CREATE TRIGGER ev_after AFTER INSERT ON ev FOR EACH ROW EXECUTE FUNCTION ev_notify();\n\
         ALTER TABLE ev OWNER TO alice;",
    );
    bounded(Duration::from_secs(120), async {
        let ep = tp.endpoint();
        let (c, mut rx) = session(&ep).await;
        // Another session keeps the pool busy, so the inserts move between backends.
        let (other, _orx) = session(&ep).await;
        let busy = tokio::spawn(async move {
            for _ in 0..200 {
                if other.simple_query("SELECT pg_sleep(0.001)").await.is_err() {
                    break;
                }
            }
        });
        c.batch_execute("LISTEN ev").await.unwrap();
        let mut late = 0;
        for i in 0..100 {
            let row = c
                .query_one("INSERT INTO ev (v) VALUES ('x') RETURNING id::text", &[])
                .await
                .unwrap();
            let id: String = row.get(0);
            match rx.try_recv() {
                Ok((ch, payload, _)) => {
                    assert_eq!(
                        (ch.as_str(), payload.as_str()),
                        ("ev", id.as_str()),
                        "insert {i}"
                    )
                }
                Err(_) => {
                    late += 1;
                    // It must still come, once.
                    let got = recv(&mut rx).await;
                    assert_eq!(got, pair("ev", &id), "insert {i}: notification never came");
                }
            }
        }
        let _ = busy.await;
        assert_eq!(
            late, 0,
            "{late} of 100 inserts completed before their trigger's notification"
        );
    })
    .await;
}

/// A client that listens and stops reading is ended (FATAL 53200) once 16 MiB of notifications
/// wait for it, instead of growing the gateway's memory without end (issue 12); the session that
/// sends them, and others, go on.
#[tokio::test]
async fn a_listener_that_stops_reading_is_ended_and_memory_stays_bounded() {
    let (_pg, tp) = start(4);
    bounded(Duration::from_secs(180), async {
        let ep = tp.endpoint();
        let (slow, conn) = ep
            .pg_config(ALICE.0, ALICE.1, APP_DB)
            .connect(NoTls)
            .await
            .expect("login through the gateway");
        let (pause_tx, pause_rx) = tokio::sync::oneshot::channel::<()>();
        let (resume_tx, resume_rx) = tokio::sync::oneshot::channel::<()>();
        // Reads until paused, then holds the socket without reading until resumed; returns how
        // many notifications it got and the error that ended the connection, if any.
        let reader = tokio::spawn(async move {
            let mut conn = conn;
            let mut got = 0usize;
            tokio::select! {
                _ = async {
                    while let Some(Ok(_)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {}
                } => {}
                _ = pause_rx => {}
            }
            let _ = resume_rx.await;
            loop {
                match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(_))) => got += 1,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return (got, Some(e)),
                    None => return (got, None),
                }
            }
        });
        slow.batch_execute("LISTEN big").await.unwrap();
        pause_tx.send(()).unwrap();

        let (sender, _rx) = session(&ep).await;
        let before = testkit::process::rss_kib(tp.gateway_pid());
        // 6,000 distinct notifications of ~8 KB: 48 MB, three times the bound.
        let sent = 6000;
        for batch in 0..12 {
            sender
                .batch_execute(&format!(
                    "SELECT pg_notify('big', repeat('x', 7990) || g) \
                     FROM generate_series({}, {}) AS g",
                    batch * 500 + 1,
                    batch * 500 + 500
                ))
                .await
                .unwrap();
        }
        // Give the fan-out time to reach the gateway.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let grown_mib = (testkit::process::rss_kib(tp.gateway_pid()).saturating_sub(before)) / 1024;
        let row = sender.query_one("SELECT 1::int", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 1, "the sender goes on");

        resume_tx.send(()).unwrap();
        let (got, err) = reader.await.unwrap();
        eprintln!("gateway RSS grew {grown_mib} MiB; the slow client got {got} of {sent}; ended by {err:?}");
        assert!(got < sent, "the slow client was not cut off: it got all {got}");
        if let Some(e) = &err {
            if let Some(db) = e.as_db_error() {
                assert_eq!(db.code().code(), "53200", "{e}");
            }
        }
        assert!(
            grown_mib < 40,
            "the gateway held {grown_mib} MiB for one client that does not read"
        );
        drop(slow);
    })
    .await;
}
