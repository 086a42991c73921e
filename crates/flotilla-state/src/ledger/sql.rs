//! A query text with numbered `$n` placeholders and its arguments, built clause by clause.
//! `$n` is understood by PostgreSQL and by SQLite alike; batch inserts on SQLite use `?`
//! instead (see [`Sql::for_backend`]).

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, Row};

use crate::error::StateError;

#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Int(Option<i64>),
    Float(Option<f64>),
    Text(Option<String>),
}

#[derive(Debug, Default)]
pub(crate) struct Sql {
    pub(crate) text: String,
    args: Vec<Arg>,
    /// `?` instead of `$n`: SQLite looks a numbered parameter up by name, in a time that
    /// grows with the statement's parameter count, which made wide batch inserts quadratic
    /// (measured with `examples/ledger_insert.rs`). Only for text whose placeholders are
    /// all bound in order, which `bind` guarantees.
    anonymous: bool,
}

impl Sql {
    pub(crate) fn new(text: &str) -> Sql {
        Sql {
            text: text.to_string(),
            args: Vec::new(),
            anonymous: false,
        }
    }

    /// A statement for `backend`: anonymous `?` placeholders on SQLite.
    pub(crate) fn for_backend(text: &str, backend: crate::db::Backend) -> Sql {
        Sql {
            anonymous: backend == crate::db::Backend::Sqlite,
            ..Sql::new(text)
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> &mut Sql {
        self.text.push_str(text);
        self
    }

    /// Appends the placeholder for `arg`.
    pub(crate) fn bind(&mut self, arg: Arg) -> &mut Sql {
        self.args.push(arg);
        if self.anonymous {
            self.text.push('?');
        } else {
            self.text.push('$');
            self.text.push_str(&self.args.len().to_string());
        }
        self
    }

    /// `(`$a, $b, ...`)` for one row of values.
    pub(crate) fn bind_row(&mut self, args: impl IntoIterator<Item = Arg>) -> &mut Sql {
        self.text.push('(');
        for (i, arg) in args.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.bind(arg);
        }
        self.text.push(')');
        self
    }

    pub(crate) fn query(&self) -> Query<'_, Any, AnyArguments<'_>> {
        self.args
            .iter()
            .fold(sqlx::query(&self.text), |q, arg| match arg {
                Arg::Int(v) => q.bind(*v),
                Arg::Float(v) => q.bind(*v),
                Arg::Text(v) => q.bind(v.as_deref()),
            })
    }
}

pub(crate) fn int(v: i64) -> Arg {
    Arg::Int(Some(v))
}

pub(crate) fn text(v: &str) -> Arg {
    Arg::Text(Some(clean_text(v)))
}

pub(crate) fn opt_text(v: Option<&str>) -> Arg {
    Arg::Text(v.map(clean_text))
}

/// Unknown stays NULL; NaN and infinities are stored as unknown too (SQLite would store NaN
/// as NULL anyway, PostgreSQL would keep it: this keeps the backends alike).
pub(crate) fn opt_float(v: Option<f64>) -> Arg {
    Arg::Float(v.filter(|x| x.is_finite()))
}

/// PostgreSQL's TEXT cannot hold NUL; one in an upstream error message must not cost the
/// whole batch.
pub(crate) fn clean_text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{fffd}")
    } else {
        s.to_string()
    }
}

pub(crate) fn get_i32(row: &AnyRow, col: &str) -> Result<i32, StateError> {
    let v: i64 = row.try_get(col)?;
    i32::try_from(v).map_err(|_| out_of_range(col, v))
}

pub(crate) fn get_opt_i32(row: &AnyRow, col: &str) -> Result<Option<i32>, StateError> {
    let v: Option<i64> = row.try_get(col)?;
    v.map(|v| i32::try_from(v).map_err(|_| out_of_range(col, v)))
        .transpose()
}

pub(crate) fn get_bool(row: &AnyRow, col: &str) -> Result<bool, StateError> {
    let v: i64 = row.try_get(col)?;
    Ok(v != 0)
}

fn out_of_range(col: &str, v: i64) -> StateError {
    StateError::Db(format!("column {col} holds {v}, out of range"))
}
