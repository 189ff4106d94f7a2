//! CI runs every fuzz target for a bounded number of inputs (a few seconds each on this
//! machine); `ephemera-fuzz --iterations N` runs longer.

#[test]
fn no_parser_that_faces_the_network_panics() {
    std::panic::set_hook(Box::new(|_| {}));
    for target in ephemera_fuzz::TARGETS {
        let corpus = ephemera_fuzz::corpus(target.name);
        assert!(!corpus.is_empty(), "{} has no corpus", target.name);
        if let Err(f) = ephemera_fuzz::fuzz(target, &corpus, 7, 5_000) {
            let _ = std::panic::take_hook();
            panic!(
                "{} panicked at seed {} iteration {}: {} (input hex {})",
                f.target,
                f.seed,
                f.iteration,
                f.message,
                f.input
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
        }
    }
}

/// The mutator is deterministic: a seed is a replayable run.
#[test]
fn the_same_seed_gives_the_same_inputs() {
    let corpus = vec![b"seed input".to_vec()];
    let run = |seed| {
        let mut rng = ephemera_fuzz::Rng::new(seed);
        (0..100)
            .map(|_| ephemera_fuzz::mutate(&corpus[0], &corpus, &["x"], &mut rng))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}
