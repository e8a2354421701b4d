//! What a session reads back from its backend when a statement may have changed its settings
//! or channels: the query (`pg_settings`, custom settings by name, names found in the bodies
//! of functions it called, `pg_listening_channels()`), run by the response state machine
//! (`responses.rs`, `Internal::Snapshot`).

use shared::settings::Settings;

/// The first column of the rows the read-back adds for the backend's channels. Not a possible
/// setting name (Postgres allows only letters, digits, `_`, `$` and `.` in those).
pub const MARKER: &str = "tidepool listen";

/// The query that reads a session's settings back from its backend.
/// `role` is not in `pg_settings` (GUC_NO_SHOW_ALL), so it is read on its own; `none` means
/// not set.
const SNAPSHOT_SQL: &str =
    "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
     WHERE source = 'session' UNION ALL SELECT 'role', pg_catalog.current_setting('role') \
     WHERE pg_catalog.current_setting('role') <> 'none'";

/// The read-back query for a session: `pg_settings` and `role`, plus the custom settings
/// (placeholders, which `pg_settings` hides) it has or may have set.
pub fn snapshot_sql(watch: &mut Vec<String>, settings: &Settings, channels_only: bool) -> String {
    if channels_only {
        return format!(
            "SELECT {}, c FROM pg_catalog.pg_listening_channels() AS c",
            shared::settings::literal(MARKER)
        );
    }
    // The gateway's watch list: custom setting names, and (as `name(`) functions the session
    // called that are not built-in, whose bodies may set custom settings by name. A body is
    // read once per session (then `name()` marks it read); the names found join the list.
    let (functions, mut names) = {
        let mut functions = Vec::new();
        let mut names = Vec::new();
        for n in watch.iter() {
            if n.ends_with("()") {
                continue;
            } else if n.ends_with('(') {
                let read = format!("{n})");
                if !watch.contains(&read) {
                    functions.push(n.clone());
                }
            } else {
                names.push(n.clone());
            }
        }
        for f in &functions {
            watch.push(format!("{f})"));
        }
        (functions, names)
    };
    for (k, _) in settings.iter() {
        if k.contains('.') && !names.iter().any(|n| n == k) {
            names.push(k.to_owned());
        }
    }
    // The channels the backend listens on: always with the settings (a user function may run
    // LISTEN; `pg_listening_channels()` costs next to nothing beside `pg_settings`).
    let channels = {
        format!(
            " UNION ALL SELECT {}, c FROM pg_catalog.pg_listening_channels() AS c",
            shared::settings::literal(MARKER)
        )
    };
    let bodies = function_bodies_sql(&functions);
    if names.is_empty() {
        return format!("{SNAPSHOT_SQL}{bodies}{channels}");
    }
    let list: Vec<String> = names.iter().map(|n| shared::settings::literal(n)).collect();
    format!(
        "{SNAPSHOT_SQL} UNION ALL SELECT n, pg_catalog.current_setting(n, true) \
         FROM pg_catalog.unnest(ARRAY[{}]::text[]) AS n \
         WHERE pg_catalog.current_setting(n, true) IS NOT NULL{bodies}{channels}",
        list.join(", ")
    )
}

/// First column of the read-back rows that carry a custom setting name found in a function
/// body (a name with a space cannot be a setting's).
pub const BODY_MARKER: &str = "tidepool body";

/// Custom settings (`x.y`) named in the bodies of the functions a session called, and of the
/// functions those call (by name, three levels deep): `pg_settings` hides custom settings, so
/// their names must come from text, and `set_config('app.tenant', …)` inside a function is not
/// in the calling statement's text. Each name comes back twice: as `(BODY_MARKER, name)`, to be
/// watched from then on, and with its value if it has one. Only procedural and SQL bodies
/// (`prolang` not internal 12 or C 13); the names are looked up by `pg_proc`'s name index. The
/// patterns avoid backslashes, so `standard_conforming_strings` does not matter. Costly
/// (regular expressions over bodies): once per session and function.
fn function_bodies_sql(functions: &[String]) -> String {
    if functions.is_empty() {
        return String::new();
    }
    let list: Vec<String> = functions
        .iter()
        .map(|f| shared::settings::literal(f.trim_end_matches('(')))
        .collect();
    format!(
        " UNION ALL SELECT x.k, x.v FROM (\
         WITH RECURSIVE f(src, d) AS (\
         SELECT p.prosrc, 0 FROM pg_catalog.pg_proc p \
         WHERE p.proname = ANY (ARRAY[{}]::pg_catalog.name[]) AND p.prolang NOT IN (12, 13) \
         UNION SELECT p.prosrc, f.d + 1 FROM f, \
         pg_catalog.regexp_matches(f.src, '([A-Za-z_][A-Za-z0-9_$]*)[[:space:]]*[(]', 'g') AS m(a), \
         pg_catalog.pg_proc p WHERE f.d < 3 \
         AND p.proname = pg_catalog.lower(m.a[1])::pg_catalog.name \
         AND p.pronamespace <> 'pg_catalog'::pg_catalog.regnamespace \
         AND p.prolang NOT IN (12, 13)) \
         SELECT DISTINCT pg_catalog.lower(m.a[1]) AS n FROM f, pg_catalog.regexp_matches(f.src, \
         '([A-Za-z_][A-Za-z0-9_$]*[.][A-Za-z_][A-Za-z0-9_$]*)', 'g') AS m(a)) AS b, \
         LATERAL (VALUES ({}, b.n), (b.n, pg_catalog.current_setting(b.n, true))) AS x(k, v) \
         WHERE x.v IS NOT NULL",
        list.join(", "),
        shared::settings::literal(BODY_MARKER)
    )
}
