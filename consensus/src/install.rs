//! `tidepool install`: puts the systemd units of config/systemd/ (gateway, pooler, control
//! process) into a root directory with this machine's binary, config and state paths filled
//! in, the example configs beside them where none is there yet, and, when asked, the gateway's
//! OS user (systemd-sysusers). docs/systemd.md is the operator's view.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cli::InstallArgs;
use crate::error::{Error, Result};

/// (file name, template) of each unit.
pub const UNITS: [(&str, &str); 3] = [
    (
        "tidepool-gateway.service",
        include_str!("../../config/systemd/tidepool-gateway.service"),
    ),
    (
        "tidepool-pooler.service",
        include_str!("../../config/systemd/tidepool-pooler.service"),
    ),
    (
        "tidepool-control.service",
        include_str!("../../config/systemd/tidepool-control.service"),
    ),
];

/// (file name, example) of each process's config.
const CONFIGS: [(&str, &str); 3] = [
    ("gateway.toml", include_str!("../../config/gateway.toml")),
    ("pooler.toml", include_str!("../../config/pooler.toml")),
    ("tidepool.toml", include_str!("../../config/tidepool.toml")),
];

/// The binaries the units start.
const PROGRAMS: [&str; 3] = ["tidepool", "tidepool-gateway", "tidepool-pooler"];

/// What the templates' `@NAME@` placeholders become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub bin_dir: PathBuf,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub user: String,
    pub pg_user: String,
}

impl Paths {
    /// Fills in a unit template.
    pub fn render(&self, template: &str) -> String {
        template
            .replace("@BIN_DIR@", &self.bin_dir.display().to_string())
            .replace("@CONFIG_DIR@", &self.config_dir.display().to_string())
            .replace("@STATE_DIR@", &self.state_dir.display().to_string())
            .replace("@PG_USER@", &self.pg_user)
            .replace("@USER@", &self.user)
    }

    /// Absolute paths and plain names only: a unit file gives `%`, `$`, quotes, backslashes
    /// and spaces meanings of their own.
    fn check(&self) -> Result<()> {
        for (what, p) in [
            ("--bin-dir", &self.bin_dir),
            ("--config-dir", &self.config_dir),
            ("--state-dir", &self.state_dir),
        ] {
            let text = p.display().to_string();
            if !p.is_absolute() || !plain(&text) {
                return Err(Error::Conflict(format!(
                    "{what} {text:?} must be an absolute path without spaces, %, $, quotes or \
                     backslashes (it goes into systemd unit files)"
                )));
            }
        }
        for (what, name) in [("--user", &self.user), ("--pg-user", &self.pg_user)] {
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                && !name.starts_with('-');
            if !ok {
                return Err(Error::Conflict(format!(
                    "{what} {name:?} is not a user name"
                )));
            }
        }
        Ok(())
    }
}

fn plain(text: &str) -> bool {
    !text
        .chars()
        .any(|c| c.is_whitespace() || matches!(c, '%' | '$' | '"' | '\'' | '\\'))
}

/// `path` (absolute) inside `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

pub fn run(args: &InstallArgs) -> Result<bool> {
    let bin_dir = match &args.bin_dir {
        Some(d) => std::path::absolute(d).map_err(Error::io("resolving --bin-dir"))?,
        None => std::env::current_exe()
            .map_err(Error::io("finding the tidepool executable"))?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::Conflict("the tidepool executable has no directory".into()))?,
    };
    let paths = Paths {
        bin_dir,
        config_dir: args.config_dir.clone(),
        state_dir: args.state_dir.clone(),
        user: args.user.clone(),
        pg_user: args.pg_user.clone(),
    };
    paths.check()?;
    for program in PROGRAMS {
        let p = paths.bin_dir.join(program);
        if !p.is_file() {
            return Err(Error::Conflict(format!(
                "{} not found: --bin-dir must hold {} (cargo build --release puts them in \
                 target/release)",
                p.display(),
                PROGRAMS.join(", ")
            )));
        }
    }
    let root = &args.root;

    let unit_dir = under(root, Path::new("/etc/systemd/system"));
    create_dir(&unit_dir)?;
    for (name, template) in UNITS {
        let path = unit_dir.join(name);
        write(&path, &paths.render(template), 0o644)?;
        println!("wrote {}", path.display());
    }

    let config_dir = under(root, &paths.config_dir);
    create_dir(&config_dir)?;
    for (name, example) in CONFIGS {
        let path = config_dir.join(name);
        if path.exists() {
            println!("kept {} (already there)", path.display());
            continue;
        }
        let text = if name == "tidepool.toml" {
            example.replace(
                "\ndir = \".tidepool\"\n",
                &format!("\ndir = \"{}\"\n", paths.state_dir.display()),
            )
        } else {
            example.to_string()
        };
        write(&path, &text, 0o644)?;
        println!("wrote {}", path.display());
    }

    if args.create_user {
        create_user(root, &paths)?;
    }

    let at = if root == Path::new("/") {
        String::new()
    } else {
        format!(" (on the system whose root is {})", root.display())
    };
    println!(
        "\nNext{at}:\n  \
         systemctl daemon-reload\n  \
         systemctl enable --now tidepool-pooler.service tidepool-gateway.service\n  \
         # with standbys, once the cluster is made (as {pg}: tidepool up --dir {state} --standbys N):\n  \
         systemctl enable --now tidepool-control.service\n\
         Edit {cfg}/gateway.toml and {cfg}/pooler.toml first (listen addresses, pooler, pg_port,\n  \
         link_secret_file: the cluster's link.key, a mode-600 copy owned by each process's user;\n  \
         off loopback, link_tls_cert/link_tls_key for the pooler and link_tls_ca for the gateway).",
        pg = paths.pg_user,
        state = paths.state_dir.display(),
        cfg = paths.config_dir.display(),
    );
    Ok(true)
}

/// The gateway's OS user, declared for systemd-sysusers (so it also exists after a reinstall
/// of the system from the same root) and created now.
fn create_user(root: &Path, paths: &Paths) -> Result<()> {
    let dir = under(root, Path::new("/etc/sysusers.d"));
    create_dir(&dir)?;
    let conf = dir.join("tidepool.conf");
    write(
        &conf,
        &format!(
            "# Written by `tidepool install --create-user`: the Tidepool gateway's OS user.\n\
             u {} - \"Tidepool gateway\" / /usr/sbin/nologin\n",
            paths.user
        ),
        0o644,
    )?;
    println!("wrote {}", conf.display());
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.display()))
        .arg(&conf)
        .output()
        .map_err(|e| {
            Error::Environment(format!(
                "systemd-sysusers: {e}; create the user yourself: useradd --system --no-create-home \
                 --shell /usr/sbin/nologin {}",
                paths.user
            ))
        })?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(Error::Environment(format!(
            "systemd-sysusers failed ({}): {}",
            out.status,
            text.trim()
        )));
    }
    println!(
        "user {}: {}",
        paths.user,
        if text.trim().is_empty() {
            "already there".to_string()
        } else {
            text.trim().replace('\n', "; ")
        }
    );
    Ok(())
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(Error::io(format!("writing {}", tmp.display())))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("chmod {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Paths {
        Paths {
            bin_dir: "/usr/local/bin".into(),
            config_dir: "/etc/tidepool".into(),
            state_dir: "/var/lib/tidepool".into(),
            user: "tidepool".into(),
            pg_user: "postgres".into(),
        }
    }

    #[test]
    fn every_placeholder_is_filled_in() {
        for (name, template) in UNITS {
            let unit = paths().render(template);
            assert!(!unit.contains('@'), "{name}:\n{unit}");
            assert!(unit.contains("ExecStart=/usr/local/bin/tidepool"), "{name}");
            assert!(unit.contains("Restart=on-failure"), "{name}");
            assert!(
                unit.contains("ExecReload=/bin/kill -HUP $MAINPID"),
                "{name}"
            );
            assert!(unit.contains("LimitNOFILE="), "{name}");
            assert!(unit.contains("NoNewPrivileges=yes"), "{name}");
        }
    }

    #[test]
    fn odd_paths_and_names_are_refused() {
        assert!(paths().check().is_ok());
        for bad in ["relative/bin", "/opt/my bin", "/opt/100%", "/opt/$HOME"] {
            let p = Paths {
                bin_dir: bad.into(),
                ..paths()
            };
            assert!(p.check().is_err(), "{bad}");
        }
        let p = Paths {
            user: "-r".into(),
            ..paths()
        };
        assert!(p.check().is_err());
    }
}
