//! A walk over a parsed TOML table that knows where it is: every value is
//! taken by name, checked for its type, and any error names the exact field
//! path (`guests.web.disk[1].path`). Keys left over at the end are unknown
//! fields, which are errors.

use toml::{Table, Value};

use crate::FileError;

/// What a TOML value is, for "expected X, found Y" messages.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// A key as TOML would write it in a dotted path: bare when it can be,
/// quoted otherwise.
pub(crate) fn key_text(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        key.to_string()
    } else {
        Value::String(key.to_string()).to_string()
    }
}

/// A table being read, with its place in the file.
#[derive(Debug)]
pub(crate) struct Fields {
    table: Table,
    /// The dotted path of this table; empty at the top of the file.
    path: String,
    origin: String,
    /// The keys asked for so far: what an unknown field could have been.
    known: Vec<&'static str>,
}

impl Fields {
    /// The top-level table of the file `origin`.
    pub(crate) fn root(table: Table, origin: &str) -> Self {
        Self::at(table, String::new(), origin)
    }

    /// A table at `path` in the file `origin`.
    pub(crate) fn at(table: Table, path: String, origin: &str) -> Self {
        Self {
            table,
            path,
            origin: origin.to_string(),
            known: Vec::new(),
        }
    }

    /// The dotted path of `key` in this table.
    pub(crate) fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key_text(key)
        } else {
            format!("{}.{}", self.path, key_text(key))
        }
    }

    /// The dotted path of this table itself.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// An error about `key` of this table.
    pub(crate) fn error(&self, key: &str, problem: impl Into<String>) -> FileError {
        FileError::Field {
            origin: self.origin.clone(),
            field: self.path_of(key),
            problem: problem.into(),
        }
    }

    /// An error about item `index` of the array under `key`.
    pub(crate) fn item_error(
        &self,
        key: &str,
        index: usize,
        problem: impl Into<String>,
    ) -> FileError {
        FileError::Field {
            origin: self.origin.clone(),
            field: format!("{}[{index}]", self.path_of(key)),
            problem: problem.into(),
        }
    }

    fn type_error(&self, key: &str, wanted: &str, found: &Value) -> FileError {
        self.error(key, format!("expected {wanted}, found {}", kind(found)))
    }

    /// Whether the table has `key` (it stays to be taken).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// The keys not taken yet, in file order.
    pub(crate) fn remaining_keys(&self) -> Vec<String> {
        self.table.keys().cloned().collect()
    }

    /// Takes `key`'s value, if present.
    pub(crate) fn take(&mut self, key: &'static str) -> Option<Value> {
        self.known.push(key);
        self.table.remove(key)
    }

    /// Takes the value under a key that is not a fixed name (a guest name).
    pub(crate) fn take_any(&mut self, key: &str) -> Option<Value> {
        self.table.remove(key)
    }

    /// Takes a string.
    pub(crate) fn string(&mut self, key: &'static str) -> Result<Option<String>, FileError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.type_error(key, "a string", &other)),
        }
    }

    /// Takes a string that must be there and must not be empty.
    pub(crate) fn required_string(&mut self, key: &'static str) -> Result<String, FileError> {
        match self.string(key)? {
            None => Err(self.error(key, "is required")),
            Some(s) if s.is_empty() => Err(self.error(key, "is empty")),
            Some(s) => Ok(s),
        }
    }

    /// Takes a boolean.
    pub(crate) fn boolean(&mut self, key: &'static str) -> Result<Option<bool>, FileError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(b)),
            Some(other) => Err(self.type_error(key, "true or false", &other)),
        }
    }

    /// Takes an integer.
    pub(crate) fn integer(&mut self, key: &'static str) -> Result<Option<i64>, FileError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Integer(i)) => Ok(Some(i)),
            Some(other) => Err(self.type_error(key, "an integer", &other)),
        }
    }

    /// Takes a table.
    pub(crate) fn table(&mut self, key: &'static str) -> Result<Option<Fields>, FileError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Table(t)) => Ok(Some(Fields::at(t, self.path_of(key), &self.origin))),
            Some(other) => Err(self.type_error(key, "a table", &other)),
        }
    }

    /// Takes the table under a key that is not a fixed name (a guest name).
    pub(crate) fn named_table(&mut self, key: &str) -> Result<Fields, FileError> {
        match self.table.remove(key) {
            Some(Value::Table(t)) => Ok(Fields::at(t, self.path_of(key), &self.origin)),
            Some(other) => Err(self.type_error(key, "a table", &other)),
            None => Err(self.error(key, "is missing")),
        }
    }

    /// Takes an array of tables (`[[key]]`); absent means empty.
    pub(crate) fn tables(&mut self, key: &'static str) -> Result<Vec<Fields>, FileError> {
        let items = match self.take(key) {
            None => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(other) => return Err(self.type_error(key, "an array of tables", &other)),
        };
        let base = self.path_of(key);
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Table(t) => Ok(Fields::at(t, format!("{base}[{i}]"), &self.origin)),
                other => Err(FileError::Field {
                    origin: self.origin.clone(),
                    field: format!("{base}[{i}]"),
                    problem: format!("expected a table, found {}", kind(&other)),
                }),
            })
            .collect()
    }

    /// Ends the walk: any key not taken is an unknown field.
    pub(crate) fn finish(self) -> Result<(), FileError> {
        let Some(key) = self.table.keys().next() else {
            return Ok(());
        };
        let mut known = self.known.clone();
        known.sort_unstable();
        known.dedup();
        Err(self.error(
            key,
            format!("unknown field (known here: {})", known.join(", ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Fields {
        Fields::root(text.parse::<Table>().unwrap(), "t.toml")
    }

    #[test]
    fn keys_that_need_quotes_are_quoted_in_paths() {
        assert_eq!(key_text("web-1"), "web-1");
        assert_eq!(key_text("a.b"), "\"a.b\"");
        assert_eq!(key_text(""), "\"\"");
    }

    #[test]
    fn type_errors_name_the_path_and_both_kinds() {
        let mut f = fields("[a]\nb = 1\n");
        let mut a = f.table("a").unwrap().unwrap();
        let err = a.string("b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.toml: a.b: expected a string, found an integer"
        );
    }

    #[test]
    fn array_items_carry_their_index() {
        let mut f = fields("x = [{}, 3]\n");
        let err = f.tables("x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.toml: x[1]: expected a table, found an integer"
        );
    }

    #[test]
    fn leftover_keys_are_unknown_fields_with_a_hint() {
        let mut f = fields("a = \"x\"\nzz = 1\n");
        f.string("a").unwrap();
        f.boolean("b").unwrap();
        assert_eq!(
            f.finish().unwrap_err().to_string(),
            "t.toml: zz: unknown field (known here: a, b)"
        );
    }

    #[test]
    fn required_strings_must_be_there_and_non_empty() {
        let mut f = fields("a = \"\"\n");
        assert_eq!(
            f.required_string("a").unwrap_err().to_string(),
            "t.toml: a: is empty"
        );
        assert_eq!(
            f.required_string("b").unwrap_err().to_string(),
            "t.toml: b: is required"
        );
    }
}
