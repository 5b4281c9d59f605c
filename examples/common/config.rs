//! Example settings from flags and from a TOML or JSON config file.
//!
//! Every flag of an example is also a key of its config file, under the flag's name with `_`
//! for `-` (`--offset-weight 0.5` is `offset_weight = 0.5`). Precedence: a flag given on the
//! command line beats the file, which beats the flag's default. Unknown keys in the file are an
//! error, so a typo cannot silently fall back to a default. The effective settings are printed
//! at start as TOML (and saved next to the outputs), so a run can be repeated from its log with
//! `--config`.

use std::error::Error;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{Map, Value};

/// Key of the config-file flag itself; never read from a file, never printed.
const CONFIG_KEY: &str = "config";

/// Parses the command line into `T`, merging in the file given by `--config` (if any).
pub fn parse<T>() -> Result<T, Box<dyn Error>>
where
    T: CommandFactory + FromArgMatches + Serialize + DeserializeOwned,
{
    parse_from(std::env::args_os())
}

/// As [`parse`], from the given arguments (the first is the program name).
pub fn parse_from<T, I, S>(args: I) -> Result<T, Box<dyn Error>>
where
    T: CommandFactory + FromArgMatches + Serialize + DeserializeOwned,
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let matches = T::command().get_matches_from(args);
    let cli = T::from_arg_matches(&matches)?;
    let Some(path) = matches.get_one::<std::path::PathBuf>(CONFIG_KEY).cloned() else {
        return Ok(cli);
    };
    let file = read_file(&path)?;
    let mut merged = match serde_json::to_value(&cli)? {
        Value::Object(m) => m,
        _ => return Err("the example's settings must serialize to a map".into()),
    };
    for (key, value) in file {
        if key == CONFIG_KEY {
            continue;
        }
        if !merged.contains_key(&key) {
            let known: Vec<&str> = merged
                .keys()
                .map(String::as_str)
                .filter(|k| *k != CONFIG_KEY)
                .collect();
            return Err(format!(
                "{}: unknown key {key:?}; the keys are {}",
                path.display(),
                known.join(", ")
            )
            .into());
        }
        let from_command_line = matches.try_get_raw(&key).ok().flatten().is_some()
            && matches.value_source(&key) == Some(ValueSource::CommandLine);
        if !from_command_line {
            merged.insert(key, value);
        }
    }
    serde_json::from_value(Value::Object(merged))
        .map_err(|e| format!("{}: {e}", path.display()).into())
}

/// Reads a `.toml` or `.json` file into a map of settings.
fn read_file(path: &Path) -> Result<Map<String, Value>, Box<dyn Error>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    let value: Value = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => {
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        Some("toml") => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?,
        _ => return Err(format!("config {}: use a .toml or .json file", path.display()).into()),
    };
    match value {
        Value::Object(m) => Ok(m),
        _ => Err(format!("{}: expected a table of settings", path.display()).into()),
    }
}

/// The effective settings as TOML (without the `config` key and unset options).
pub fn to_toml<T: Serialize>(settings: &T) -> Result<String, Box<dyn Error>> {
    let mut value = serde_json::to_value(settings)?;
    if let Value::Object(m) = &mut value {
        m.remove(CONFIG_KEY);
        m.retain(|_, v| !v.is_null());
    }
    Ok(toml::to_string(&value)?)
}

/// Prints the effective settings and saves them to `path` (parent folders created).
pub fn print_and_save<T: Serialize>(settings: &T, path: &Path) -> Result<(), Box<dyn Error>> {
    let text = to_toml(settings)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, &text)?;
    println!(
        "# Effective config (saved to {}; rerun with --config {0}):",
        path.display()
    );
    println!("```toml\n{}```", text);
    Ok(())
}
