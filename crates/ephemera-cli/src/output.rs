//! Output: every command prints text for people or, with `--output json`, JSON for scripts.

use serde_json::Value;

use crate::Output;

pub(crate) fn print(out: Output, value: Value, text: impl FnOnce() -> String) {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value).expect("json")),
        Output::Text => println!("{}", text()),
    }
}
