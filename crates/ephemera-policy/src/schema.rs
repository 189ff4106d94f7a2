//! The Cedar schema, parsed once per process.

use std::sync::OnceLock;

use cedar_policy::Schema;

/// The schema's source, as shipped (`ephemera policy schema` prints it).
pub const SCHEMA_TEXT: &str = include_str!("ephemera.cedarschema");

/// The parsed schema. It is part of the binary, so a parse failure is a build defect.
pub fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let (schema, _warnings) =
            Schema::from_cedarschema_str(SCHEMA_TEXT).expect("the built-in Cedar schema parses");
        schema
    })
}
