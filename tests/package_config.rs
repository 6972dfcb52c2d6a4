//! The Debian package's `/etc/dolores/dolores.toml` (`debian/dolores.toml`): unchanged it
//! gives the defaults with the service's paths, it lists every setting of the README, and
//! the defaults it shows in comments are the real ones. (`tests/package/test.sh` installs
//! the package and runs the server with it.)

use std::path::{Path, PathBuf};

use dolores::config::{Options, Settings};

fn conffile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("debian/dolores.toml")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn resolve(path: PathBuf) -> Settings {
    let options = Options {
        config: Some(path),
        ..Options::default()
    };
    Settings::resolve(&options).unwrap_or_else(|e| panic!("{e}"))
}

/// The defaults, but listening and keeping data where the service does.
fn service_defaults() -> String {
    format!(
        "{:?}",
        Settings {
            listen: "127.0.0.1:8007".into(),
            data: "/var/lib/dolores".into(),
            ..Settings::default()
        }
    )
}

/// `(key, value)` of each `# key = value` line: a setting shown but left out.
fn commented_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# "))
        .filter_map(|line| line.split_once(" = "))
        .filter(|(key, _)| key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

#[test]
fn unchanged_it_gives_the_defaults_on_loopback_with_data_in_var_lib() {
    let settings = resolve(conffile());
    assert_eq!(format!("{settings:?}"), service_defaults());
}

#[test]
fn it_lists_every_setting_of_the_readme() {
    let readme = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"));
    let text = read(&conffile());
    // The settings table: | `--flag` | `DOLORES_…` | `key` | default | what |
    let keys: Vec<&str> = readme
        .lines()
        .filter(|line| line.starts_with("| `--"))
        .filter_map(|line| line.split('|').nth(3))
        .map(|cell| cell.trim().trim_matches('`'))
        .collect();
    assert!(keys.len() >= 13, "the README's settings table: {keys:?}");
    for key in keys {
        let listed = text
            .lines()
            .any(|l| l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key} = ")));
        assert!(listed, "{key} is not in debian/dolores.toml");
    }
}

#[test]
fn the_commented_values_are_valid_toml_and_the_defaults_are_true() {
    let text = read(&conffile());
    let commented = commented_settings(&text);
    for (key, value) in &commented {
        let line = format!("{key} = {value}");
        if let Err(e) = line.parse::<toml::Table>() {
            panic!("`{line}` is not TOML: {e}");
        }
    }
    // The settings that have a default (the rest show an example value).
    let with_defaults = [
        "memory",
        "redis_prefix",
        "heartbeat",
        "retention",
        "max_stored_messages",
        "listener_ttl",
        "max_message_bytes",
    ];
    let mut uncommented = text.clone();
    for key in with_defaults {
        let (_, value) = commented
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("{key} is not shown commented"));
        uncommented.push_str(&format!("{key} = {value}\n"));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dolores.toml");
    std::fs::write(&path, uncommented).expect("write");
    assert_eq!(format!("{:?}", resolve(path)), service_defaults());
}
