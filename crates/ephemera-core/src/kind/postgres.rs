//! PostgreSQL logins: a role of this kind names a database connection and the statements that
//! create, renew and drop a login there; a lease is one login (a PostgreSQL role with a password
//! and `VALID UNTIL` the lease's expiry).
//!
//! Nothing here touches a database. The login lives outside the cluster, so issuing, renewing,
//! revoking and expiring such a lease each record an external effect (`state::effects`) in the
//! same entry, which the leader's executor carries out. The statement templates are stored
//! verbatim and rendered by the executor, which escapes every value with PostgreSQL's own
//! identifier and literal quoting; here they are only checked to use known placeholders.
//!
//! The password is never in a command, the state or a snapshot: the node that answers and the
//! leader's executor both derive it after commit from a KEK-derived key and the lease id, and
//! [`password_from_seed`] turns that seed into text of the role's [`PasswordPolicy`].
//!
//! The username is a pure function of the lease: the template's `{{random}}` is the lease id's
//! 128 random bits (32 hex characters, stamped by the leader and checked unique by `apply`), so
//! usernames are unique with no index of their own, and at most 63 bytes (PostgreSQL's limit)
//! by construction of the template's budget.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{invalid, CedarView, CredentialKind, GrantContext, Kind, Renewal, SignerKind};
use crate::command::validate_name;
use crate::error::Error;

/// PostgreSQL truncates identifiers beyond 63 bytes (NAMEDATALEN - 1).
pub const MAX_USERNAME_LEN: usize = 63;
pub const MAX_STATEMENTS: usize = 16;
pub const MAX_STATEMENT_LEN: usize = 16 * 1024;
pub const MAX_TEMPLATE_LEN: usize = 128;
/// How much of the role name `{{role}}` contributes to a username.
pub const ROLE_IN_USERNAME: usize = 20;
pub const DEFAULT_USERNAME_TEMPLATE: &str = "eph_{{role}}_{{random}}";
pub const MIN_PASSWORD_LEN: u16 = 16;
pub const MAX_PASSWORD_LEN: u16 = 128;
pub const DEFAULT_PASSWORD_LEN: u16 = 32;
/// Symbols that need no quoting in a connection URL, a shell word or a libpq keyword value.
pub const SYMBOLS: &str = "!#%+,-.:=?@^_~";

/// Placeholders of the username template and the width each can take.
const USERNAME_PLACEHOLDERS: [(&str, usize); 3] = [
    ("role", ROLE_IN_USERNAME),
    ("random", 32),
    ("unix_time", 10),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CharClass {
    Lower,
    Upper,
    Digit,
    Symbol,
}

impl CharClass {
    pub const ALL: [CharClass; 4] = [
        CharClass::Lower,
        CharClass::Upper,
        CharClass::Digit,
        CharClass::Symbol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CharClass::Lower => "lower",
            CharClass::Upper => "upper",
            CharClass::Digit => "digit",
            CharClass::Symbol => "symbol",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    fn chars(self) -> &'static [u8] {
        match self {
            CharClass::Lower => b"abcdefghijklmnopqrstuvwxyz",
            CharClass::Upper => b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            CharClass::Digit => b"0123456789",
            CharClass::Symbol => SYMBOLS.as_bytes(),
        }
    }
}

/// How issued passwords look: this many characters, each class at least once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordPolicy {
    pub length: u16,
    pub classes: BTreeSet<CharClass>,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        PasswordPolicy {
            length: DEFAULT_PASSWORD_LEN,
            classes: [CharClass::Lower, CharClass::Upper, CharClass::Digit].into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The database connection (`ephemera db connection put`) the logins are created on.
    pub connection: String,
    /// Run in one transaction to create a login: `{{name}}`, `{{password}}`, `{{expiration}}`.
    pub creation_statements: Vec<String>,
    /// Run to drop a login (`{{name}}`); empty means the default revocation.
    pub revocation_statements: Vec<String>,
    /// Run to extend a login (`{{name}}`, `{{expiration}}`); empty means `ALTER ROLE … VALID UNTIL`.
    pub renew_statements: Vec<String>,
    /// `{{role}}`, `{{random}}` (required), `{{unix_time}}`, and `[a-z0-9_-]` around them.
    pub username_template: String,
    /// Terminate the login's sessions before dropping it (default revocation only).
    pub terminate_sessions: bool,
    pub password: PasswordPolicy,
}

/// A caller asks for a login of the role; the role decides everything about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {}

/// What the lease records of its login (the password is derived, never recorded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub connection: String,
    pub username: String,
    /// How the derived password looks (the role's policy when the login was issued).
    pub password: PasswordPolicy,
}

impl Grant {
    /// The effects target of this login's database: the executor's unit of independence.
    pub fn target(&self) -> String {
        target_of(&self.connection)
    }
}

/// The effects target of a connection.
pub fn target_of(connection: &str) -> String {
    format!("postgres/{connection}")
}

pub struct Postgres;

impl Kind for Postgres {
    const NAME: CredentialKind = CredentialKind::Postgres;
    const RENEWAL: Renewal = Renewal::Extend;
    const SIGNER: SignerKind = SignerKind::None;
    type Spec = Spec;
    type Request = Request;
    type Grant = Grant;

    fn validate_spec(s: &Spec) -> Result<(), Error> {
        validate_name("connection name", &s.connection)?;
        validate_statements("creation", &s.creation_statements, &CREATION, true)?;
        validate_statements("revocation", &s.revocation_statements, &["name"], false)?;
        validate_statements("renew", &s.renew_statements, &["name", "expiration"], false)?;
        if !s
            .creation_statements
            .iter()
            .any(|t| t.contains("{{password}}"))
        {
            return Err(invalid(
                "the creation statements must set the login's password with {{password}}".into(),
            ));
        }
        validate_username_template(&s.username_template)?;
        validate_password_policy(&s.password)
    }

    fn validate_request(_r: &Request) -> Result<(), Error> {
        Ok(())
    }

    fn grant(s: &Spec, _r: &Request, ctx: &GrantContext<'_>) -> Result<Grant, Error> {
        Ok(Grant {
            connection: s.connection.clone(),
            username: username(&s.username_template, ctx.role, ctx.lease_id, ctx.now_ms)?,
            password: s.password.clone(),
        })
    }

    fn cedar_role(_s: &Spec) -> CedarView<'_> {
        CedarView::default()
    }

    fn cedar_request<'a>(_s: &'a Spec, _r: &'a Request) -> CedarView<'a> {
        CedarView::default()
    }

    fn cedar_grant(_g: &Grant) -> CedarView<'_> {
        CedarView::default()
    }

    fn audit(g: &Grant) -> BTreeMap<String, String> {
        [
            ("connection".to_string(), g.connection.clone()),
            ("username".to_string(), g.username.clone()),
        ]
        .into()
    }
}

const CREATION: [&str; 3] = ["name", "password", "expiration"];

/// The placeholders of `template`, in order, or the first malformed or unknown one.
pub fn placeholders<'a>(template: &'a str, known: &[&str]) -> Result<Vec<&'a str>, Error> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(invalid(format!(
                "unclosed placeholder in template at {:?}",
                &rest[start..(start + 20).min(rest.len())]
            )));
        };
        let name = &after[..end];
        if !known.contains(&name) {
            return Err(invalid(format!(
                "unknown placeholder {{{{{name}}}}} (known: {})",
                known
                    .iter()
                    .map(|k| format!("{{{{{k}}}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        out.push(name);
        rest = &after[end + 2..];
    }
    if rest.contains("}}") {
        return Err(invalid("a stray }} in template".into()));
    }
    Ok(out)
}

fn validate_statements(
    what: &str,
    statements: &[String],
    known: &[&str],
    required: bool,
) -> Result<(), Error> {
    if statements.len() > MAX_STATEMENTS || (required && statements.is_empty()) {
        return Err(invalid(format!(
            "{what} statements: {} to {MAX_STATEMENTS} statements",
            u8::from(required)
        )));
    }
    let mut names = false;
    for (i, st) in statements.iter().enumerate() {
        if st.trim().is_empty() || st.len() > MAX_STATEMENT_LEN {
            return Err(invalid(format!(
                "{what} statement {} must be 1 to {MAX_STATEMENT_LEN} bytes",
                i + 1
            )));
        }
        if st.contains('\0') {
            return Err(invalid(format!(
                "{what} statement {} contains a NUL byte",
                i + 1
            )));
        }
        names |= placeholders(st, known)
            .map_err(|e| invalid(format!("{what} statement {}: {e}", i + 1)))?
            .contains(&"name");
    }
    if !statements.is_empty() && !names {
        return Err(invalid(format!(
            "the {what} statements never name the login: use {{{{name}}}}"
        )));
    }
    Ok(())
}

fn username_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
}

pub fn validate_username_template(t: &str) -> Result<(), Error> {
    if t.is_empty() || t.len() > MAX_TEMPLATE_LEN {
        return Err(invalid(format!(
            "the username template must be 1 to {MAX_TEMPLATE_LEN} bytes"
        )));
    }
    let known: Vec<&str> = USERNAME_PLACEHOLDERS.iter().map(|(n, _)| *n).collect();
    let used = placeholders(t, &known)?;
    if used.iter().filter(|p| **p == "random").count() != 1 {
        return Err(invalid(
            "the username template must use {{random}} exactly once (it makes usernames unique)"
                .into(),
        ));
    }
    let mut literal = t.to_string();
    for (name, _) in USERNAME_PLACEHOLDERS {
        literal = literal.replace(&format!("{{{{{name}}}}}"), "");
    }
    if let Some(c) = literal.bytes().find(|b| !username_char(*b)) {
        return Err(invalid(format!(
            "the username template may contain only a-z, 0-9, '_' and '-' around its \
             placeholders, not {:?}",
            c as char
        )));
    }
    let widest: usize = literal.len()
        + used
            .iter()
            .map(|p| {
                USERNAME_PLACEHOLDERS
                    .iter()
                    .find(|(n, _)| n == p)
                    .map_or(0, |(_, w)| *w)
            })
            .sum::<usize>();
    if widest > MAX_USERNAME_LEN {
        return Err(invalid(format!(
            "the username template can expand to {widest} bytes; PostgreSQL keeps \
             {MAX_USERNAME_LEN} ({{{{role}}}} takes up to {ROLE_IN_USERNAME}, {{{{random}}}} 32, \
             {{{{unix_time}}}} 10)"
        )));
    }
    Ok(())
}

/// The username of the login for lease `lease_id` under role `role`, issued at `now_ms`.
pub fn username(template: &str, role: &str, lease_id: &str, now_ms: u64) -> Result<String, Error> {
    let random = lease_id.strip_prefix("l_").unwrap_or(lease_id);
    if random.len() != 32 || !random.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Internal(format!(
            "lease id {lease_id} does not carry 128 random bits"
        )));
    }
    let role: String = role
        .bytes()
        .map(|b| {
            let b = b.to_ascii_lowercase();
            if username_char(b) {
                b as char
            } else {
                '_'
            }
        })
        .take(ROLE_IN_USERNAME)
        .collect();
    let name = template
        .replace("{{role}}", &role)
        .replace("{{random}}", &random.to_ascii_lowercase())
        .replace("{{unix_time}}", &(now_ms / 1000).to_string());
    if name.len() > MAX_USERNAME_LEN || !name.bytes().all(username_char) {
        return Err(invalid(format!(
            "the username template gives {name:?}, not a valid username"
        )));
    }
    Ok(name)
}

pub fn validate_password_policy(p: &PasswordPolicy) -> Result<(), Error> {
    if !(MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&p.length) {
        return Err(invalid(format!(
            "the password length must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN}"
        )));
    }
    if p.classes.is_empty() {
        return Err(invalid(
            "the password policy needs at least one character class (lower, upper, digit, symbol)"
                .into(),
        ));
    }
    Ok(())
}

/// A password of `policy` from a 32-byte secret seed: deterministic, so the node that answers
/// and the leader's executor derive the same one, and uniform over the policy's alphabet apart
/// from one position per class that holds a character of that class.
pub fn password_from_seed(seed: &[u8; 32], policy: &PasswordPolicy) -> zeroize::Zeroizing<String> {
    let mut stream = ByteStream::new(seed);
    let alphabet: Vec<u8> = policy
        .classes
        .iter()
        .flat_map(|c| c.chars().iter().copied())
        .collect();
    let len = usize::from(policy.length);
    let mut out: Vec<u8> = (0..len).map(|_| stream.pick(&alphabet)).collect();
    // One distinct position per class, so that every class is present.
    let mut positions: Vec<usize> = (0..len).collect();
    for (i, class) in policy.classes.iter().enumerate() {
        let j = i + stream.below(len - i);
        positions.swap(i, j);
        out[positions[i]] = stream.pick(class.chars());
    }
    zeroize::Zeroizing::new(String::from_utf8(out).expect("the alphabets are ASCII"))
}

/// The password of lease `lease_id`'s login, derived from the KEK (see `Kek::lease_secret`).
pub fn password(
    kek: &crate::crypto::Kek,
    lease_id: &str,
    policy: &PasswordPolicy,
) -> zeroize::Zeroizing<String> {
    password_from_seed(&kek.lease_secret("postgres-password", lease_id), policy)
}

/// SHA-256 in counter mode over the seed, drawn without bias by rejection.
struct ByteStream {
    seed: [u8; 32],
    counter: u64,
    block: [u8; 32],
    at: usize,
}

impl ByteStream {
    fn new(seed: &[u8; 32]) -> Self {
        ByteStream {
            seed: *seed,
            counter: 0,
            block: [0; 32],
            at: 32,
        }
    }

    fn byte(&mut self) -> u8 {
        if self.at == 32 {
            let mut h = Sha256::new();
            h.update(b"ephemera/postgres-password/v1");
            h.update(self.seed);
            h.update(self.counter.to_be_bytes());
            self.block = h.finalize().into();
            self.counter += 1;
            self.at = 0;
        }
        self.at += 1;
        self.block[self.at - 1]
    }

    /// Uniform in `0..n` for `1 <= n <= 256`.
    fn below(&mut self, n: usize) -> usize {
        let zone = 256 - 256 % n;
        loop {
            let b = usize::from(self.byte());
            if b < zone {
                return b % n;
            }
        }
    }

    fn pick(&mut self, set: &[u8]) -> u8 {
        set[self.below(set.len())]
    }
}

impl Drop for ByteStream {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.seed);
        zeroize::Zeroize::zeroize(&mut self.block);
    }
}
