//! Where each node of the document is: `services[1].backends[0].weight` -> line and column.
//!
//! serde_yaml gives positions only for the first error it stops at, so the document is walked
//! once more with `saphyr-parser`, whose events carry spans, to place every later error (unknown
//! keys, validation) on the node it is about.

use std::collections::{HashMap, HashSet};

use saphyr_parser::{Event, Marker, Parser, ScalarStyle, ScanError, Span};

/// Deeper than any lb config; stops a hostile file from overflowing the stack.
const MAX_DEPTH: usize = 64;

/// The largest config file lb reads: far beyond any real one (10,000 backends take ~500 KB).
pub(super) const MAX_BYTES: usize = 4 << 20;

/// Refuses, in one linear pass, a text too large or with flow collections (`[`, `{`) nested
/// deeper than [`MAX_DEPTH`]: a YAML parser can take minutes on such a file. Brackets inside
/// quoted strings and comments do not count.
pub(super) fn shape(text: &str) -> Result<(), (Pos, String)> {
    if text.len() > MAX_BYTES {
        return Err((
            Pos::START,
            format!(
                "the file is {} bytes; lb reads config files of at most {} MiB",
                text.len(),
                MAX_BYTES >> 20
            ),
        ));
    }
    #[derive(PartialEq)]
    enum In {
        Plain,
        Single,
        Double,
        Comment,
    }
    let (mut line, mut column) = (1usize, 0usize);
    let mut state = In::Plain;
    let mut depth = 0usize;
    let mut escaped = false;
    let mut previous = '\n';
    for c in text.chars() {
        column += 1;
        match state {
            In::Comment if c == '\n' => state = In::Plain,
            In::Comment => {}
            In::Single if c == '\'' => state = In::Plain,
            In::Double if escaped => escaped = false,
            In::Double if c == '\\' => escaped = true,
            In::Double if c == '"' => state = In::Plain,
            In::Single | In::Double => {}
            In::Plain => match c {
                '#' if previous.is_whitespace() => state = In::Comment,
                '\'' => state = In::Single,
                '"' => state = In::Double,
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err((
                            Pos { line, column },
                            format!(
                                "nesting deeper than {MAX_DEPTH} levels; an lb config needs about 5"
                            ),
                        ));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        if c == '\n' {
            line += 1;
            column = 0;
        }
        previous = c;
    }
    Ok(())
}

/// A 1-based line and column, as printed in `FILE:LINE:COL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    /// Before the first line: for errors that are about no node (I/O, an empty file).
    pub const NONE: Pos = Pos { line: 0, column: 0 };
    pub const START: Pos = Pos { line: 1, column: 1 };

    fn of(marker: Marker) -> Pos {
        Pos {
            line: marker.line(),
            column: marker.col() + 1,
        }
    }
}

/// Which part of a mapping entry an error points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Anchor {
    /// The key itself (`wieght` in `wieght: 3`).
    Key,
    /// The value (`3`); for a value that is absent, the nearest enclosing node that is there.
    Value,
}

/// An error before it is placed: what is wrong, and at which node.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Problem {
    /// In the syntax of [`join`] and [`item`]; `""` is the whole document.
    pub path: String,
    pub anchor: Anchor,
    pub message: String,
}

impl Problem {
    pub fn at_value(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            anchor: Anchor::Value,
            message: message.into(),
        }
    }

    pub fn at_key(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            anchor: Anchor::Key,
            message: message.into(),
        }
    }
}

/// `parent.key`, or `key` at the top level.
pub(super) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[index]`.
pub(super) fn item(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

#[derive(Debug, Clone, Copy)]
struct NodePos {
    key: Option<Pos>,
    value: Pos,
}

/// Path -> position of every node in the first document.
#[derive(Debug, Default)]
pub(super) struct Index {
    nodes: HashMap<String, NodePos>,
}

impl Index {
    /// Where to report a problem about `path`: the node itself, or if it is absent (a default, a
    /// merged or aliased value), its nearest ancestor that is written in the file.
    pub fn locate(&self, path: &str, anchor: Anchor) -> Pos {
        let mut path = path;
        let mut anchor = anchor;
        loop {
            if let Some(node) = self.nodes.get(path) {
                return match anchor {
                    Anchor::Key => node.key.unwrap_or(node.value),
                    Anchor::Value => node.value,
                };
            }
            if path.is_empty() {
                return Pos::START;
            }
            path = parent(path);
            anchor = Anchor::Value;
        }
    }
}

fn parent(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(cut) => &path[..cut],
        None => "",
    }
}

/// A YAML syntax error, or problems only the event stream shows (duplicate keys, a second
/// document), each with its position.
pub(super) type Located = (Pos, String);

/// Why a document has no index.
#[derive(Debug, PartialEq)]
pub(super) enum IndexError {
    /// The first syntax error; serde_yaml may word it better (see `super::parse`).
    Syntax(Located),
    /// Problems in well-formed YAML: duplicate keys, extra documents, too deep a nesting.
    Problems(Vec<Located>),
}

/// Walks the first document of `text`.
///
/// # Errors
/// The first syntax error, or every duplicate key and extra document.
pub(super) fn index(text: &str) -> Result<Index, IndexError> {
    let mut walker = Walker {
        parser: Parser::new_from_str(text),
        index: Index::default(),
        errors: Vec::new(),
    };
    match walker.document() {
        Ok(()) if walker.errors.is_empty() => Ok(walker.index),
        Ok(()) => Err(IndexError::Problems(walker.errors)),
        Err(WalkError::Syntax(e)) => Err(IndexError::Syntax((
            Pos::of(*e.marker()),
            e.info().to_owned(),
        ))),
        Err(WalkError::TooDeep(at)) => Err(IndexError::Problems(vec![(
            at,
            format!("nesting deeper than {MAX_DEPTH} levels; an lb config needs about 5"),
        )])),
    }
}

enum WalkError {
    Syntax(ScanError),
    TooDeep(Pos),
}

impl From<ScanError> for WalkError {
    fn from(e: ScanError) -> Self {
        Self::Syntax(e)
    }
}

struct Walker<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    index: Index,
    errors: Vec<Located>,
}

impl<'a> Walker<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span), ScanError> {
        // After StreamEnd the parser yields None; report that as the end again.
        self.parser
            .next_event()
            .unwrap_or_else(|| Ok((Event::StreamEnd, Span::default())))
    }

    fn peek_is_end(&mut self) -> Result<bool, ScanError> {
        match self.parser.peek() {
            Some(Ok((Event::MappingEnd | Event::SequenceEnd, _))) => Ok(true),
            Some(Ok(_)) => Ok(false),
            Some(Err(e)) => Err(e),
            None => Ok(true),
        }
    }

    fn document(&mut self) -> Result<(), WalkError> {
        let mut documents = 0;
        loop {
            let (event, span) = self.next()?;
            match event {
                Event::StreamEnd => return Ok(()),
                Event::DocumentStart(_) => {
                    documents += 1;
                    if documents == 2 {
                        self.errors.push((
                            Pos::of(span.start),
                            "a second YAML document (after `---`): lb reads one document per file"
                                .to_owned(),
                        ));
                    }
                }
                Event::DocumentEnd | Event::StreamStart | Event::Nothing => {}
                _ if documents == 1 => self.node(event, span, String::new(), None, 0)?,
                // Later documents are reported once above; their contents are skipped.
                _ => self.skip(event)?,
            }
        }
    }

    fn node(
        &mut self,
        event: Event<'a>,
        span: Span,
        path: String,
        key: Option<Pos>,
        depth: usize,
    ) -> Result<(), WalkError> {
        let start = Pos::of(span.start);
        if depth > MAX_DEPTH {
            return Err(WalkError::TooDeep(start));
        }
        match event {
            Event::Scalar(text, style, ..) => {
                // `key:` with nothing after it: point at the key, not at the end of the line.
                let value = match key {
                    Some(key) if text.is_empty() && style == ScalarStyle::Plain => key,
                    _ => start,
                };
                self.index.nodes.insert(path, NodePos { key, value });
            }
            Event::SequenceStart(..) => {
                let mut i = 0;
                while !self.peek_is_end()? {
                    let (event, span) = self.next()?;
                    self.node(event, span, item(&path, i), None, depth + 1)?;
                    i += 1;
                }
                self.next()?;
                self.index.nodes.insert(path, NodePos { key, value: start });
            }
            Event::MappingStart(..) => {
                let mut seen = HashSet::new();
                while !self.peek_is_end()? {
                    let (key_event, key_span) = self.next()?;
                    let key_pos = Pos::of(key_span.start);
                    let name = match &key_event {
                        Event::Scalar(text, ..) => text.to_string(),
                        // A mapping or sequence as a key: no lb key looks like that; the
                        // unknown-key check reports it.
                        _ => {
                            self.skip(key_event)?;
                            "?".to_owned()
                        }
                    };
                    let child = join(&path, &name);
                    if !seen.insert(name.clone()) {
                        let within = if path.is_empty() {
                            "at the top level".to_owned()
                        } else {
                            format!("in {path}")
                        };
                        self.errors.push((
                            key_pos,
                            format!("duplicate key {name:?} {within}: each key may appear once"),
                        ));
                    }
                    let (value_event, value_span) = self.next()?;
                    self.node(value_event, value_span, child, Some(key_pos), depth + 1)?;
                }
                self.next()?;
                self.index.nodes.insert(path, NodePos { key, value: start });
            }
            // An alias has no children of its own in the text: paths below it fall back to it.
            _ => {
                self.index.nodes.insert(path, NodePos { key, value: start });
            }
        }
        Ok(())
    }

    /// Consumes the rest of a node whose first event was `event`.
    fn skip(&mut self, event: Event<'a>) -> Result<(), ScanError> {
        let mut open = usize::from(matches!(
            event,
            Event::SequenceStart(..) | Event::MappingStart(..)
        ));
        while open > 0 {
            match self.next()?.0 {
                Event::SequenceStart(..) | Event::MappingStart(..) => open += 1,
                Event::SequenceEnd | Event::MappingEnd => open -= 1,
                Event::StreamEnd => break,
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(line: usize, column: usize) -> Pos {
        Pos { line, column }
    }

    #[test]
    fn positions_of_keys_values_and_items() {
        let text = "a: 1\nb:\n  - x: 1\n    y: [2, 3]\n  - z\nc:\n";
        let index = index(text).unwrap();
        assert_eq!(index.locate("a", Anchor::Value), pos(1, 4));
        assert_eq!(index.locate("a", Anchor::Key), pos(1, 1));
        assert_eq!(index.locate("b[0]", Anchor::Value), pos(3, 5));
        assert_eq!(index.locate("b[0].y[1]", Anchor::Value), pos(4, 12));
        assert_eq!(index.locate("b[1]", Anchor::Value), pos(5, 5));
        // An empty value points at its key.
        assert_eq!(index.locate("c", Anchor::Value), pos(6, 1));
        // Absent paths fall back to the nearest ancestor's value.
        assert_eq!(index.locate("b[0].nope.deeper", Anchor::Key), pos(3, 5));
        assert_eq!(index.locate("nope", Anchor::Value), pos(1, 1));
    }

    #[test]
    fn duplicate_keys_and_second_documents_are_errors() {
        let errors = index("a: 1\nb:\n  x: 1\n  x: 2\na: 3\n---\nq: 1\n").unwrap_err();
        assert_eq!(
            errors,
            IndexError::Problems(vec![
                (
                    pos(4, 3),
                    "duplicate key \"x\" in b: each key may appear once".to_owned()
                ),
                (
                    pos(5, 1),
                    "duplicate key \"a\" at the top level: each key may appear once".to_owned()
                ),
                (
                    pos(6, 1),
                    "a second YAML document (after `---`): lb reads one document per file"
                        .to_owned()
                ),
            ])
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        let error = index("a: 1\n  b: 2\n").unwrap_err();
        assert!(
            matches!(error, IndexError::Syntax((at, _)) if at == pos(2, 4)),
            "{error:?}"
        );
    }

    #[test]
    fn shape_counts_flow_brackets_only_outside_quotes_and_comments() {
        let deep = "[".repeat(65);
        assert!(shape(&format!("a: {deep}")).is_err());
        assert!(shape(&format!("a: '{deep}'")).is_ok());
        assert!(shape(&format!("a: \"{deep}\"")).is_ok());
        assert!(shape(&format!("a: \"\\\" {deep}\"")).is_ok());
        assert!(shape(&format!("a: 1 # {deep}\nb: 2")).is_ok());
        assert!(shape(&format!("{}{}", "[".repeat(64), "]".repeat(64))).is_ok());
        let (pos, _) = shape(&format!("a: 1\nb: {deep}")).unwrap_err();
        assert_eq!(
            pos,
            Pos {
                line: 2,
                column: 68
            }
        );
        assert!(shape(&" ".repeat(MAX_BYTES + 1)).is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let error = index(&text).unwrap_err();
        assert!(
            matches!(&error, IndexError::Problems(e) if e[0].1.contains("nesting deeper")),
            "{error:?}"
        );
    }
}
