//! One typed configuration per binary, layered: the defaults, then a TOML file, then `MOE_*` environment, then
//! flags; each layer sets only what it names.
//!
//! A binary's settings are one struct that is both its clap `Parser` and its serde form
//! (`#[serde(default, rename_all = "kebab-case")]`): every flag `--max-running` is the file key `max-running`, with
//! the same type and the same default, written once in the clap attribute. [`load`] reads the command line, takes
//! the file from the flag or environment variable named by [`ConfigFile`], and merges; [`ConfigFile::print`]
//! shows the result as TOML (`--print-config`).
//!
//! Errors name the file, the line and the key, in one line: an unknown key (a typo is never ignored), a value of
//! the wrong type, or a value the binary's `validate` refuses.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::de::DeserializeOwned;
use serde::Serialize;
use toml::{Table, Value};

/// Errors of configuration: each says where, in one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or a value does not fit its key.
    #[error("{}:{line}: {message}", path.display())]
    Invalid { path: PathBuf, line: usize, message: String },
    #[error("{}:{line}: unknown setting `{key}` (see --print-config for every setting)", path.display())]
    UnknownKey { path: PathBuf, line: usize, key: String },
    /// A setting the binary refuses, whichever layer it came from.
    #[error("{key}: {message}")]
    Refused { key: String, message: String },
    #[error(transparent)]
    Args(#[from] clap::Error),
}

impl ConfigError {
    /// A refused setting: `key` as in the file (kebab-case), `message` why.
    pub fn refused(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Refused { key: key.to_owned(), message: message.into() }
    }
}

/// A binary's settings: a clap parser and a serde struct at once, with a check of what no type says.
pub trait Settings: clap::Parser + Serialize + DeserializeOwned {
    /// Refuses settings that do not fit together or are out of range (naming the key).
    fn validate(&self) -> Result<(), ConfigError>;
}

/// The flags about the file itself, to flatten into a binary's arguments (not settings: never in the file).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ConfigFile {
    /// TOML file of settings (keys are the flags' names: `max-running = 64`); environment and flags override it.
    #[arg(long = "config", env = "MOE_CONFIG", value_name = "FILE")]
    pub path: Option<PathBuf>,
    /// Print the effective settings (defaults, file, environment and flags merged) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl ConfigFile {
    /// The settings as a file would hold them.
    pub fn print<T: Serialize>(settings: &T) -> Result<String, ConfigError> {
        toml::to_string(settings).map_err(|e| ConfigError::refused("(all)", e.to_string()))
    }
}

/// The defaults of `T`: its clap defaults alone, with no environment and no arguments.
pub fn defaults<T: clap::Parser>() -> T {
    let command = T::command().mut_args(|a| a.env(None));
    let name = command.get_name().to_owned();
    let matches = command.try_get_matches_from([name]).expect("every setting has a default or is optional");
    T::from_arg_matches(&matches).expect("the defaults parse")
}

/// Parses the command line (exiting on `--help`, `--version` or a bad flag as clap does), then layers defaults,
/// the file `file(&args)` names, environment and flags into one `T`, and validates it. Returns it with the file
/// flags as given.
pub fn load<T: Settings>(file: impl Fn(&T) -> &ConfigFile) -> Result<(T, ConfigFile), ConfigError> {
    let matches = T::command().get_matches();
    from_matches(&matches, file)
}

/// [`load`] from given arguments (for tests), without exiting.
pub fn load_from<T: Settings, I: Into<std::ffi::OsString> + Clone>(
    args: impl IntoIterator<Item = I>,
    file: impl Fn(&T) -> &ConfigFile,
) -> Result<(T, ConfigFile), ConfigError> {
    let matches = T::command().try_get_matches_from(args)?;
    from_matches(&matches, file)
}

fn from_matches<T: Settings>(
    matches: &ArgMatches,
    file: impl Fn(&T) -> &ConfigFile,
) -> Result<(T, ConfigFile), ConfigError> {
    let cli = T::from_arg_matches(matches)?;
    let flags = file(&cli).clone();
    let settings = merge(cli, matches, flags.path.as_deref())?;
    // What --print-config shows need not be complete yet (it is how one finds out).
    if !flags.print_config {
        settings.validate()?;
    }
    Ok((settings, flags))
}

fn merge<T: Settings>(cli: T, matches: &ArgMatches, path: Option<&Path>) -> Result<T, ConfigError> {
    let table = |v: &T| -> Table {
        match Value::try_from(v) {
            Ok(Value::Table(t)) => t,
            _ => Table::new(),
        }
    };
    let mut merged = table(&defaults::<T>());
    // Every argument is a setting, but those of the file itself.
    let known: BTreeSet<String> = T::command()
        .get_arguments()
        .filter(|a| !matches!(a.get_long(), Some("config" | "print-config" | "help" | "version")))
        .map(|a| key_of(a.get_id().as_str()))
        .collect();
    if let Some(path) = path {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let file: Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Invalid {
            path: path.into(),
            line: e.span().map_or(1, |s| line_of(s.start)),
            message: e.message().to_owned(),
        })?;
        for key in file.keys() {
            if !known.contains(key) || !merged.contains_key(key) && !optional(&T::command(), key) {
                let line = text.find(key.as_str()).map_or(1, line_of);
                return Err(ConfigError::UnknownKey { path: path.into(), line, key: key.clone() });
            }
        }
        // Each value is checked against its key's type here, so that the error can name the line.
        let typed = toml::from_str::<T>(&text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(s.start));
            let key = text.lines().nth(line - 1).and_then(|l| l.split('=').next()).map(str::trim).unwrap_or("");
            ConfigError::Invalid { path: path.into(), line, message: format!("{key}: {}", e.message()) }
        })?;
        let typed = table(&typed);
        for key in file.keys() {
            if let Some(v) = typed.get(key) {
                merged.insert(key.clone(), v.clone());
            }
        }
    }
    let given = table(&cli);
    for id in matches.ids() {
        let from_outside =
            matches!(matches.value_source(id.as_str()), Some(ValueSource::CommandLine | ValueSource::EnvVariable));
        let key = key_of(id.as_str());
        if from_outside {
            if let Some(v) = given.get(&key) {
                merged.insert(key, v.clone());
            }
        }
    }
    Value::Table(merged).try_into().map_err(|e: toml::de::Error| ConfigError::refused("(merged)", e.message()))
}

/// The file key of a clap argument id (`max_running` → `max-running`).
fn key_of(id: &str) -> String {
    id.replace('_', "-")
}

/// Whether the argument of `key` may be absent (an `Option` with no default), so that a file may set it although
/// the defaults leave it out.
fn optional(command: &clap::Command, key: &str) -> bool {
    command.get_arguments().any(|a| key_of(a.get_id().as_str()) == key && a.get_default_values().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, clap::Parser, Serialize, serde::Deserialize)]
    #[serde(default, rename_all = "kebab-case")]
    struct Demo {
        #[arg(long, env = "MOE_TEST_DEMO_RUNNING", default_value_t = 256)]
        max_running: usize,
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: std::net::SocketAddr,
        #[arg(long)]
        node_id: Option<String>,
        #[arg(long, value_delimiter = ',')]
        experts_at: Vec<String>,
        #[arg(long)]
        mapped: bool,
        #[command(flatten)]
        #[serde(skip)]
        config: ConfigFile,
    }

    impl Default for Demo {
        fn default() -> Self {
            defaults()
        }
    }

    impl Settings for Demo {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.max_running == 0 {
                return Err(ConfigError::refused("max-running", "must be positive"));
            }
            Ok(())
        }
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    /// Held by every test that reads the environment, since one of them sets it.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn load(args: &[&str]) -> Result<Demo, ConfigError> {
        let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
        load_locked(args)
    }

    fn load_locked(args: &[&str]) -> Result<Demo, ConfigError> {
        load_from(std::iter::once("demo").chain(args.iter().copied()), |d: &Demo| &d.config).map(|(d, _)| d)
    }

    #[test]
    fn defaults_come_from_the_clap_attributes() {
        let d = defaults::<Demo>();
        assert_eq!((d.max_running, d.listen.port(), d.node_id, d.mapped), (256, 8000, None, false));
    }

    #[test]
    fn the_file_sets_what_it_names_and_flags_override_it() {
        let f = file("max-running = 64\nnode-id = \"r1\"\nexperts-at = [\"a:1\", \"b:2\"]\nmapped = true\n");
        let path = f.path().to_str().expect("path");
        let d = load(&["--config", path]).expect("loads");
        assert_eq!((d.max_running, d.node_id.as_deref(), d.experts_at.len(), d.mapped), (64, Some("r1"), 2, true));
        assert_eq!(d.listen.port(), 8000, "a key the file does not name keeps its default");
        let d = load(&["--config", path, "--max-running", "8"]).expect("loads");
        assert_eq!(d.max_running, 8);
        assert_eq!(d.node_id.as_deref(), Some("r1"));
    }

    #[test]
    fn environment_overrides_the_file_and_flags_override_both() {
        let f = file("max-running = 64\n");
        let path = f.path().to_str().expect("path");
        let env = ENV.lock().unwrap_or_else(|p| p.into_inner());
        std::env::set_var("MOE_TEST_DEMO_RUNNING", "32");
        let from_env = load_locked(&["--config", path]).map(|d| d.max_running);
        let from_flag = load_locked(&["--config", path, "--max-running", "8"]).map(|d| d.max_running);
        std::env::remove_var("MOE_TEST_DEMO_RUNNING");
        drop(env);
        assert_eq!(from_env.expect("loads"), 32);
        assert_eq!(from_flag.expect("loads"), 8);
        assert_eq!(load(&["--config", path]).expect("loads").max_running, 64);
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_line() {
        let f = file("max-running = 64\nmax-runing = 3\n");
        let err = load(&["--config", f.path().to_str().expect("path")]).expect_err("a typo");
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::UnknownKey { line: 2, .. }), "{msg}");
        assert!(msg.contains("max-runing") && !msg.contains('\n'), "{msg}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_key_and_line() {
        let f = file("listen = \"127.0.0.1:9\"\nmax-running = \"many\"\n");
        let msg = load(&["--config", f.path().to_str().expect("path")]).expect_err("a string").to_string();
        assert!(msg.contains(":2: max-running:"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn validate_sees_the_merged_settings() {
        let f = file("max-running = 0\n");
        let msg = load(&["--config", f.path().to_str().expect("path")]).expect_err("zero").to_string();
        assert_eq!(msg, "max-running: must be positive");
        assert!(load(&["--config", f.path().to_str().expect("path"), "--max-running", "2"]).is_ok());
    }

    #[test]
    fn the_printed_settings_read_back_as_the_same() {
        let f = file("max-running = 64\nnode-id = \"r1\"\n");
        let d = load(&["--config", f.path().to_str().expect("path")]).expect("loads");
        let printed = file(&ConfigFile::print(&d).expect("prints"));
        let again = load(&["--config", printed.path().to_str().expect("path")]).expect("reads back");
        assert_eq!(again.max_running, 64);
        assert_eq!(again.node_id, d.node_id);
        assert_eq!(again.listen, d.listen);
    }
}
