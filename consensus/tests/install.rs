//! `tidepool install --root TEMP`: the systemd units land with this build's binary paths, the
//! configs beside them (an edited one is kept on a second install), the gateway's user is
//! created in the root's /etc/passwd, and `systemd-analyze verify` accepts every unit without
//! a warning.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testkit::{run_merged, Output};

const TIDEPOOL: &str = env!("CARGO_BIN_EXE_tidepool");

struct Root(PathBuf);

impl Root {
    fn new() -> Root {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("tp-install-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Root(dir)
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if std::env::var_os("TIDEPOOL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("kept {}", self.0.display());
        }
    }
}

fn install(args: &[&str]) -> Output {
    let mut cmd = Command::new(TIDEPOOL);
    cmd.arg("install").args(args).env_remove("TIDEPOOL_CONFIG");
    run_merged(&mut cmd, None, Duration::from_secs(60))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `key=value` lines of a unit's `[Service]` section.
fn service_keys(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .skip_while(|l| l.trim() != "[Service]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn get<'a>(keys: &'a [(String, String)], key: &str) -> Option<&'a str> {
    keys.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[test]
fn install_writes_units_configs_and_the_user_into_a_root() {
    let root = Root::new();
    let bin_dir = std::path::absolute(testkit::bin_dir()).unwrap();
    let bin = bin_dir.display().to_string();
    let rootarg = root.0.display().to_string();
    let out = install(&[
        "--root",
        &rootarg,
        "--bin-dir",
        &bin,
        "--state-dir",
        "/srv/tidepool",
        "--create-user",
    ]);
    assert!(out.success(), "{}", out.text);
    assert!(
        out.text
            .contains("systemctl enable --now tidepool-pooler.service tidepool-gateway.service"),
        "{}",
        out.text
    );

    let units = root.0.join("etc/systemd/system");
    let expect = [
        ("tidepool-gateway.service", "tidepool", "tidepool-gateway"),
        ("tidepool-pooler.service", "postgres", "tidepool-pooler"),
        ("tidepool-control.service", "postgres", "tidepool"),
    ];
    for (name, user, program) in expect {
        let text = read(&units.join(name));
        assert!(!text.contains('@'), "placeholder left in {name}:\n{text}");
        let keys = service_keys(&text);
        assert_eq!(get(&keys, "User"), Some(user), "{name}:\n{text}");
        let exec = get(&keys, "ExecStart").unwrap_or_default();
        let binary = exec.split_whitespace().next().unwrap_or_default();
        assert_eq!(Path::new(binary), bin_dir.join(program), "{name}: {exec}");
        assert!(Path::new(binary).is_file(), "{binary}");
        assert!(exec.contains("--config /etc/tidepool/"), "{name}: {exec}");
        assert_eq!(get(&keys, "Restart"), Some("on-failure"), "{name}");
        assert_eq!(
            get(&keys, "ExecReload"),
            Some("/bin/kill -HUP $MAINPID"),
            "{name}"
        );
        let nofile: u64 = get(&keys, "LimitNOFILE")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(nofile >= 65536, "{name}: LimitNOFILE {nofile}");
        assert_eq!(get(&keys, "NoNewPrivileges"), Some("yes"), "{name}");
        assert!(get(&keys, "ProtectSystem").is_some(), "{name}");
        assert_eq!(get(&keys, "CapabilityBoundingSet"), Some(""), "{name}");
    }
    let control = read(&units.join("tidepool-control.service"));
    assert!(
        control.contains("--dir /srv/tidepool ")
            && control.contains("ConditionPathExists=/srv/tidepool/state.json"),
        "{control}"
    );

    // The configs, the control's pointing at the state directory.
    let configs = root.0.join("etc/tidepool");
    for name in ["gateway.toml", "pooler.toml", "tidepool.toml"] {
        assert!(configs.join(name).is_file(), "{name}");
    }
    assert!(
        read(&configs.join("tidepool.toml")).contains("\ndir = \"/srv/tidepool\"\n"),
        "tidepool.toml names the state directory"
    );

    // The user, in the root's own passwd (never this machine's).
    let passwd = read(&root.0.join("etc/passwd"));
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("tidepool:") && l.ends_with(":/usr/sbin/nologin")),
        "{passwd}"
    );
    assert!(read(&root.0.join("etc/sysusers.d/tidepool.conf")).contains("u tidepool "));

    // Again: the units are rewritten, an operator's config is kept, the user is not doubled.
    std::fs::write(
        configs.join("gateway.toml"),
        "listen = \"127.0.0.1:6432\"\n",
    )
    .unwrap();
    std::fs::remove_file(units.join("tidepool-pooler.service")).unwrap();
    let again = install(&["--root", &rootarg, "--bin-dir", &bin, "--create-user"]);
    assert!(again.success(), "{}", again.text);
    assert!(units.join("tidepool-pooler.service").is_file());
    assert_eq!(
        read(&configs.join("gateway.toml")),
        "listen = \"127.0.0.1:6432\"\n"
    );
    assert!(again.text.contains("kept "), "{}", again.text);
    let passwd = read(&root.0.join("etc/passwd"));
    assert_eq!(
        passwd
            .lines()
            .filter(|l| l.starts_with("tidepool:"))
            .count(),
        1,
        "{passwd}"
    );

    // systemd's own reading of the units: no unknown key, no bad value, every command there.
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).is_file());
    match analyze {
        None => eprintln!("SKIPPED systemd-analyze verify: systemd-analyze is not installed"),
        Some(analyze) => {
            for (name, _, _) in expect {
                let mut cmd = Command::new(analyze);
                cmd.arg("verify").arg(units.join(name)).current_dir(&root.0);
                let out = run_merged(&mut cmd, None, Duration::from_secs(60));
                assert!(
                    out.success(),
                    "systemd-analyze verify {name}:\n{}",
                    out.text
                );
                assert!(
                    out.text.trim().is_empty(),
                    "systemd-analyze verify {name} warns:\n{}",
                    out.text
                );
            }
        }
    }
}

#[test]
fn install_refuses_a_bin_dir_without_the_binaries_and_odd_paths() {
    let root = Root::new();
    let rootarg = root.0.display().to_string();
    let empty = root.0.join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let out = install(&[
        "--root",
        &rootarg,
        "--bin-dir",
        &empty.display().to_string(),
    ]);
    assert!(!out.success(), "{}", out.text);
    assert!(out.text.contains("not found"), "{}", out.text);
    let bin = testkit::bin_dir().display().to_string();
    let out = install(&[
        "--root",
        &rootarg,
        "--bin-dir",
        &bin,
        "--config-dir",
        "/etc/my tidepool",
    ]);
    assert!(!out.success(), "{}", out.text);
    assert!(!root.0.join("etc/systemd/system").exists());
}
