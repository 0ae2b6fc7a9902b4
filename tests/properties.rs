//! Property tests of every parser entry point of `lmforge::fuzzing` (the cargo-fuzz targets'
//! code, run in CI): the seeds of `fuzz/seeds/` and the fixtures, and thousands of mutations of
//! them, are refused or accepted — never a panic.

mod common;
use common::*;
use std::path::Path;

/// Property tests: for every parser entry point, the seed inputs and thousands of mutations of
/// them (bit flips, truncations, splices, byte runs) are refused or accepted, never a panic.
#[test]
fn mutated_inputs_never_panic() {
    let seeds_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let read_dir = |t: &str| -> Vec<Vec<u8>> {
        std::fs::read_dir(seeds_dir.join(t))
            .map(|r| {
                r.flatten()
                    .map(|e| std::fs::read(e.path()).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut gguf = read_dir("gguf");
    gguf.push(std::fs::read(fixture("gguf").join("llama_q8_0.gguf")).unwrap());
    gguf.push(std::fs::read(fixture("gguf").join("quants.gguf")).unwrap());
    let st = vec![std::fs::read(fixture("llama_tiny").join("model.safetensors")).unwrap()];
    let model_dir = fixture("llama_tiny");
    type Target<'a> = (&'a str, Vec<Vec<u8>>, Box<dyn Fn(&[u8]) + 'a>, usize);
    let targets: Vec<Target> = vec![
        (
            "gguf",
            gguf,
            Box::new(|b| drop(lmforge::fuzzing::gguf(b))),
            150,
        ),
        (
            "safetensors",
            st,
            Box::new(|b| drop(lmforge::fuzzing::safetensors(b, &model_dir))),
            150,
        ),
        (
            "tokenizer_json",
            read_dir("tokenizer_json"),
            Box::new(|b| drop(lmforge::fuzzing::tokenizer_json(b))),
            100,
        ),
        (
            "chat_template",
            read_dir("chat_template"),
            Box::new(|b| drop(lmforge::fuzzing::chat_template(b))),
            1500,
        ),
        (
            "recipe",
            read_dir("recipe"),
            Box::new(|b| drop(lmforge::fuzzing::recipe(b))),
            1500,
        ),
        (
            "jsonl",
            read_dir("jsonl"),
            Box::new(|b| drop(lmforge::fuzzing::jsonl(b))),
            1500,
        ),
    ];
    let rng = &mut lmforge::rng::Rng::keyed(&[0xF022]);
    for (name, seeds, f, n) in &targets {
        assert!(!seeds.is_empty(), "{name}: no seeds");
        for s in seeds {
            f(s);
        }
        for i in 0..*n {
            let mut b = seeds[i % seeds.len()].clone();
            for _ in 0..1 + below(rng, 4) {
                mutate(&mut b, rng);
            }
            f(&b);
        }
    }
}

fn mutate(b: &mut Vec<u8>, rng: &mut lmforge::rng::Rng) {
    if b.is_empty() {
        b.push(below(rng, 256) as u8);
        return;
    }
    let at = below(rng, b.len());
    match below(rng, 6) {
        0 => b[at] ^= 1 << below(rng, 8),
        1 => b.truncate(at),
        2 => b[at] = [0, 0xff, 0x7f, 0x80, b'{', b'"'][below(rng, 6)],
        3 => {
            let n = 1 + below(rng, 8.min(b.len() - at));
            let run: Vec<u8> = b[at..at + n].to_vec();
            let to = below(rng, b.len());
            b.splice(to..to, run);
        }
        4 => {
            // A large little-endian integer where a length or count may be.
            let end = (at + 8).min(b.len());
            b[at..end].fill(0xff);
        }
        _ => {
            b.remove(at);
        }
    }
}

fn below(rng: &mut lmforge::rng::Rng, n: usize) -> usize {
    rng.below(n as u64) as usize
}
