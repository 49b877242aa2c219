//! The configuration: the only place YAML is seen.
//!
//! `text -> Config` in four steps, each in its own file:
//! - `locate.rs`: walk the document for the position of every node (and catch syntax errors,
//!   duplicate keys, extra documents);
//! - `raw.rs`: report and remove unknown keys, then let serde read the rest into raw structs
//!   (`deny_unknown_fields`) whose leaves are untyped scalars;
//! - `validate.rs`: raw -> the strong types of `types.rs`, with every default filled in;
//! - here: place each problem at `FILE:LINE:COL` and report them all, in file order.
//!
//! `config/lb.yaml` at the repository root documents every key with its default.

mod locate;
mod raw;
mod types;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::Path;

// The strong types are the module's API; which of them a given build reads varies.
pub use types::*;

use locate::{IndexError, Pos, Problem};
use serde_yaml::Value;

/// One problem in a config file, at `line` and `column` (both 1-based; 0 and 0 when it is about
/// no place in the file, such as a file that cannot be read).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// One line, saying what is wrong and what would be right.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a file, in file order; never empty.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    /// One `FILE:LINE:COL: message` per line, as `lb check` prints them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates the config file at `path`.
///
/// # Errors
/// Every problem in the file, or the one reason it could not be read.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &file),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file,
            line: Pos::NONE.line,
            column: Pos::NONE.column,
            message: format!("cannot read the config file: {e}"),
        }])),
    }
}

/// Validates config `text`; `file` names it in messages.
///
/// # Errors
/// Every problem found: a syntax error alone (nothing after it can be trusted), else all unknown
/// keys, the first value of the wrong shape (a list where a mapping belongs) and every
/// validation problem.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let place = |pos: Pos, message: &str| ConfigError {
        file: file.to_owned(),
        line: pos.line,
        column: pos.column,
        message: one_line(message),
    };
    let fail = |pos: Pos, message: &str| Err(ConfigErrors(vec![place(pos, message)]));
    let syntax_error = |pos: Pos, message: &str| {
        // The most common YAML mistake, and neither parser names it.
        let at = text
            .lines()
            .nth(pos.line.wrapping_sub(1))
            .and_then(|l| l.chars().nth(pos.column.wrapping_sub(1)));
        let line = text
            .lines()
            .nth(pos.line.wrapping_sub(1))
            .unwrap_or_default();
        if at == Some('\t') {
            fail(
                pos,
                &format!("{message} (a tab: YAML indents with spaces only)"),
            )
        } else if line.contains(": [") && line.contains("]:") {
            // `listen: [::1]:8080` reads as the start of a YAML list.
            fail(
                pos,
                &format!("{message} (quote IPv6 addresses: \"[::1]:8080\")"),
            )
        } else {
            fail(pos, message)
        }
    };

    // A hostile shape is refused in one linear pass before either parser sees it: libyaml
    // takes minutes over 100,000 nested brackets.
    if let Err((pos, message)) = locate::shape(text) {
        return fail(pos, &message);
    }
    // Both parsers read the text: saphyr for positions, serde_yaml for values. On a syntax
    // error libyaml's message (with the context it was parsing) is the better one; saphyr's is
    // used when it alone refuses the text. saphyr goes first: what it refuses outright (too
    // deep, a duplicate key) never reaches libyaml.
    let index = locate::index(text);
    if let Err(IndexError::Problems(errors)) = index {
        let errors = errors.iter().map(|(pos, message)| place(*pos, message));
        return Err(ConfigErrors(errors.collect()));
    }
    let (index, mut document) = match (index, serde_yaml::from_str::<Value>(text)) {
        (Ok(index), Ok(document)) => (index, document),
        (Err(IndexError::Problems(errors)), _) => {
            let errors = errors.iter().map(|(pos, message)| place(*pos, message));
            return Err(ConfigErrors(errors.collect()));
        }
        (_, Err(e)) => {
            let pos = e.location().map_or(Pos::START, |l| Pos {
                line: l.line(),
                column: l.column(),
            });
            return syntax_error(pos, &e.to_string());
        }
        (Err(IndexError::Syntax((pos, message))), Ok(_)) => return syntax_error(pos, &message),
    };
    if document.is_null() {
        return fail(
            Pos::START,
            "the file is empty; a config needs at least a services: list (see config/lb.yaml)",
        );
    }
    if let Err(e) = document.apply_merge() {
        return fail(
            Pos::START,
            &format!("a merge key (<<) cannot be applied: {e}"),
        );
    }

    let mut problems = Vec::new();
    raw::strip_unknown_keys(&mut document, &mut problems);
    match serde_path_to_error::deserialize::<_, raw::RawConfig>(document) {
        Ok(raw) => match validate::validate(&raw) {
            Ok(config) if problems.is_empty() => return Ok(config),
            Ok(_) => {}
            Err(more) => problems.extend(more),
        },
        Err(e) => {
            let path = path_of(e.path());
            let what = if path.is_empty() {
                "the file".to_owned()
            } else {
                path.clone()
            };
            problems.push(Problem::at_value(&path, format!("{what}: {}", e.inner())));
        }
    }

    let mut errors: Vec<(Pos, &str)> = problems
        .iter()
        .map(|p| (index.locate(&p.path, p.anchor), p.message.as_str()))
        .collect();
    // Stable: problems at one place keep the order they were found in.
    errors.sort_by_key(|(pos, _)| *pos);
    Err(ConfigErrors(
        errors
            .into_iter()
            .map(|(pos, message)| place(pos, message))
            .collect(),
    ))
}

/// A serde path in the syntax of `locate::join` and `locate::item`.
fn path_of(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            serde_path_to_error::Segment::Seq { index } => out = locate::item(&out, *index),
            serde_path_to_error::Segment::Map { key } => out = locate::join(&out, key),
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {}
        }
    }
    out
}

/// `lb check` prints one error per line, whatever a library's message looks like.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join(" ")
}
