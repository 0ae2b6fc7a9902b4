//! Options from three places, one schema: a method's options struct derives `clap::Args` (its
//! flags) and serde (its TOML config), and `load` layers them:
//!
//!   defaults (the struct's)  <  --config FILE.toml  <  --set key.path=value  <  flags given
//!
//! Unknown keys are errors naming the key and where it came from. A run saves the resolved
//! options as TOML, and `--resume` starts from that file instead of the defaults.

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashSet;
use std::path::Path;

/// The defaults a `clap::Args` struct declares, as if no flag were given.
pub fn clap_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    // Only reachable with a struct that has a required flag: a programming error, not input.
    let m = cmd
        .try_get_matches_from(Vec::<String>::new())
        .expect("options structs give every flag a default or make it optional");
    T::from_arg_matches(&m).expect("defaults parse")
}

/// `impl Default` for options structs: the defaults their flags declare.
#[macro_export]
macro_rules! clap_default {
    ($($t:ty),* $(,)?) => {$(
        impl Default for $t {
            fn default() -> Self {
                $crate::config::clap_defaults()
            }
        }
    )*};
}

/// Where `load` starts: the struct's defaults, or a saved run's options (`--resume`).
pub enum Base<'a> {
    Defaults,
    Saved { text: &'a str, origin: &'a str },
}

/// Layers `base`, the `config` file, `--set` overrides and the flags of `cli` whose ids are in
/// `given` (the flags typed on the command line), then checks the result against `T`.
pub fn load<T: Serialize + DeserializeOwned>(
    base: Base,
    config: Option<&Path>,
    set: &[String],
    cli: &T,
    given: &HashSet<String>,
) -> Result<T> {
    let mut table = match base {
        Base::Defaults => toml::Table::new(),
        Base::Saved { text, origin } => parse_table(text, origin)?,
    };
    if let Some(p) = config {
        let origin = p.display().to_string();
        let text = crate::input::read_text(p, crate::input::MAX_CONFIG_BYTES)?;
        merge(&mut table, parse_table(&text, &origin)?);
        check::<T>(&table, &origin)?;
    }
    for s in set {
        apply_set(&mut table, s)?;
        check::<T>(&table, &format!("--set {s}"))?;
    }
    let flags = match toml::Value::try_from(cli)? {
        toml::Value::Table(t) => keep_given(t, given),
        _ => bail!("internal error: options are not a table"),
    };
    merge(&mut table, flags);
    check::<T>(&table, "options")
}

fn parse_table(text: &str, origin: &str) -> Result<toml::Table> {
    toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))
}

fn check<T: DeserializeOwned>(table: &toml::Table, origin: &str) -> Result<T> {
    serde_path_to_error::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!("{origin}: key {path}: {}", e.into_inner())
    })
}

/// `over`'s keys replace `base`'s; tables merge key by key.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The leaves of `t` whose key is a flag given on the command line (field name = clap id).
fn keep_given(t: toml::Table, given: &HashSet<String>) -> toml::Table {
    t.into_iter()
        .filter_map(|(k, v)| match v {
            toml::Value::Table(sub) => {
                let sub = keep_given(sub, given);
                (!sub.is_empty()).then_some((k, toml::Value::Table(sub)))
            }
            v => given.contains(&k).then_some((k, v)),
        })
        .collect()
}

/// `train.lr=1e-3` sets table["train"]["lr"]; the value is read as TOML (so `3`, `1e-3`,
/// `true`, `["a"]` keep their types) and falls back to a string.
fn apply_set(table: &mut toml::Table, spec: &str) -> Result<()> {
    let Some((key, raw)) = spec.split_once('=') else {
        bail!("--set {spec:?}: expected key.path=value");
    };
    let key = key.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().context("--set: empty key")?;
    if last.is_empty() {
        bail!("--set {spec:?}: empty key");
    }
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .with_context(|| format!("--set {key}: {p} is not a table"))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

/// Options written as the TOML a run saves (and `--config` reads back).
pub fn to_toml<T: Serialize>(opts: &T) -> Result<String> {
    Ok(toml::to_string_pretty(opts)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::engine::TrainArgs;
    use serde::Deserialize;

    #[derive(clap::Parser, Serialize, Deserialize, Default, Debug)]
    #[serde(deny_unknown_fields, default)]
    struct Opts {
        #[arg(long, default_value = "m")]
        model: String,
        #[command(flatten)]
        train: TrainArgs,
    }

    fn given(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn layers_apply_in_order_and_unknown_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("lmforge-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "model = \"file\"\n[train]\nlr = 0.5\nseed = 3\n").unwrap();
        let cli = Opts {
            model: "flag".into(),
            train: TrainArgs {
                seed: Some(9),
                ..Default::default()
            },
        };
        let o: Opts = load(
            Base::Defaults,
            Some(&f),
            &["train.lr=0.25".into()],
            &cli,
            &given(&["seed"]),
        )
        .unwrap();
        assert_eq!(o.model, "file"); // the flag was not typed, the file's value stands
        assert_eq!(o.train.lr, Some(0.25)); // --set beats the file
        assert_eq!(o.train.seed, Some(9)); // a typed flag beats both
        let e = load::<Opts>(
            Base::Defaults,
            None,
            &["train.learning_rate=1".into()],
            &cli,
            &given(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("learning_rate"), "{e}");
        std::fs::write(&f, "[train]\nmax_steps = \"lots\"\n").unwrap();
        let e = load::<Opts>(Base::Defaults, Some(&f), &[], &cli, &given(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml") && e.contains("train.max_steps"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
