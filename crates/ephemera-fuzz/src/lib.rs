//! Fuzz targets for the parsers that face the network (JWTs and assertions, CSRs, SSH public
//! keys, forwarded cluster commands, policy text, node configuration files), and a seeded
//! mutation fuzzer that runs them on stable Rust (no nightly toolchain, so no libFuzzer here).
//!
//! The property every target checks: no input makes the parser panic, and what it accepts it
//! accepts consistently. The fuzzer is not coverage-guided: it mutates the corpus in
//! `corpus/<target>/` (bit flips, byte and chunk edits, splices, dictionary tokens) with a
//! seeded RNG, so a failure is reproduced by its seed and iteration.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// A fuzz target: feeds one input to one parser.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// Tokens worth splicing in (delimiters and keywords of the format).
    pub dictionary: &'static [&'static str],
}

/// Text parsers get every input: invalid UTF-8 becomes U+FFFD rather than an empty string.
fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "jwt",
        run: |d| {
            let _ = ephemera_core::token::parse(&text(d));
        },
        dictionary: &[".", "eyJ", "\"alg\"", "\"EdDSA\"", "\"kid\"", "=", "-", "_"],
    },
    Target {
        name: "csr",
        run: |d| {
            let _ = ephemera_pki::parse_csr(&text(d));
        },
        dictionary: &[
            "-----BEGIN CERTIFICATE REQUEST-----\n",
            "\n-----END CERTIFICATE REQUEST-----\n",
            "MII",
            "spiffe://",
        ],
    },
    Target {
        name: "ssh_public_key",
        run: |d| {
            let _ = ephemera_node::mint::parse_public_key(&text(d));
        },
        dictionary: &["ssh-ed25519 ", "ecdsa-sha2-nistp256 ", "AAAA", " "],
    },
    Target {
        name: "forwarded_command",
        run: |d| {
            use prost::Message;
            if let Ok(req) = ephemera_proto::internal::ForwardRequest::decode(d) {
                let _ = ephemera_raft::decode::<ephemera_node::node::Forwarded>(&req.proposal);
            }
            let _ = ephemera_raft::decode::<ephemera_node::node::Forwarded>(d);
        },
        dictionary: &["\u{0}", "\u{1}", "\u{ff}", "\n"],
    },
    Target {
        name: "policy",
        run: |d| {
            let _ = ephemera_policy::PolicyBook::compile(&text(d), 1);
        },
        dictionary: &[
            "permit",
            "forbid",
            "(",
            ")",
            "principal",
            "action",
            "resource",
            "when",
            "{",
            "}",
            ";",
            "@id(\"x\")",
            "Ephemera::",
            "==",
            "in",
            "context.",
        ],
    },
    Target {
        name: "node_config",
        run: |d| {
            if let Ok(cfg) = toml::from_str::<ephemera_node::NodeConfig>(&text(d)) {
                let _ = cfg.validate();
            }
        },
        dictionary: &[
            "[",
            "]",
            "=",
            "\"",
            "\n",
            "[tls]",
            "[[oidc_issuers]]",
            "127.0.0.1:1",
        ],
    },
];

/// A small deterministic generator (SplitMix64), so a run is its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// One mutation of `input` (corpus entries are spliced from `corpus`).
pub fn mutate(input: &[u8], corpus: &[Vec<u8>], dictionary: &[&str], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                out.insert(i, rng.next_u64() as u8);
            }
            3 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                out.drain(start..end);
            }
            4 if !dictionary.is_empty() => {
                let token = dictionary[rng.below(dictionary.len())].as_bytes();
                let i = rng.below(len + 1);
                out.splice(i..i, token.iter().copied());
            }
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let take = (1 + rng.below(64)).min(other.len() - from);
                    let i = rng.below(len + 1);
                    out.splice(i..i, other[from..from + take].iter().copied());
                }
            }
            _ if len > 1 => {
                // Duplicate a chunk: repetition finds length and nesting bugs.
                let start = rng.below(len);
                let end = (start + 1 + rng.below(32)).min(len);
                let chunk = out[start..end].to_vec();
                out.splice(end..end, chunk);
            }
            _ => out.push(rng.next_u64() as u8),
        }
    }
    out.truncate(64 * 1024);
    out
}

/// A panic found by the fuzzer, with what reproduces it.
#[derive(Debug)]
pub struct Finding {
    pub target: &'static str,
    pub seed: u64,
    pub iteration: u64,
    pub input: Vec<u8>,
    pub message: String,
}

/// Runs `target` for `iterations` mutated inputs from `corpus` (and the corpus itself).
pub fn fuzz(
    target: &Target,
    corpus: &[Vec<u8>],
    seed: u64,
    iterations: u64,
) -> Result<(), Finding> {
    let run = |input: &[u8], iteration: u64| {
        catch_unwind(AssertUnwindSafe(|| (target.run)(input))).map_err(|panic| Finding {
            target: target.name,
            seed,
            iteration,
            input: input.to_vec(),
            message: panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into()),
        })
    };
    for entry in corpus {
        run(entry, 0)?;
    }
    let empty = [Vec::new()];
    let pool = if corpus.is_empty() {
        &empty[..]
    } else {
        corpus
    };
    let mut rng = Rng::new(seed);
    let mut current = pool[0].clone();
    for i in 1..=iterations {
        // Walk away from a corpus entry for a while, then start again from another.
        if i % 32 == 0 {
            current = pool[rng.below(pool.len())].clone();
        }
        current = mutate(&current, pool, target.dictionary, &mut rng);
        run(&current, i)?;
    }
    Ok(())
}

/// The corpus of a target, from `corpus/<name>/` in this crate.
pub fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    entries
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}
