//! Randomized robustness tests (seeded, so a failure reproduces): decoding and patching never
//! panic on arbitrary input, and field sets survive their FieldsV1 encoding.

use serde_json::{Map, Value, json};

/// xorshift64*: small, deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Keys that exercise the merge rules: merge-keyed lists, sets, directives, plain fields.
const KEYS: &[&str] = &[
    "containers",
    "ports",
    "env",
    "name",
    "containerPort",
    "port",
    "image",
    "finalizers",
    "metadata",
    "labels",
    "spec",
    "volumes",
    "$patch",
    "$retainKeys",
    "$setElementOrder/containers",
    "$deleteFromPrimitiveList/finalizers",
    "a",
    "b",
    "k:{\"x\":1}",
    "f:y",
    ".",
];

fn value(rng: &mut Rng, depth: u32) -> Value {
    let choice = if depth == 0 { rng.below(5) } else { rng.below(8) };
    match choice {
        0 => Value::Null,
        1 => json!(rng.below(3) == 0),
        2 => json!(rng.below(100) as i64 - 50),
        3 => json!(rng.pick(&["web", "replace", "delete", "merge", "", "x", "80"])),
        4 => json!(rng.pick(KEYS)),
        5 | 6 => {
            let mut map = Map::new();
            for _ in 0..rng.below(5) {
                map.insert(rng.pick(KEYS).to_string(), value(rng, depth - 1));
            }
            Value::Object(map)
        }
        _ => Value::Array((0..rng.below(4)).map(|_| value(rng, depth - 1)).collect()),
    }
}

#[test]
fn decoding_arbitrary_bytes_never_panics() {
    let mut rng = Rng(0x5eed_0001);
    for _ in 0..3000 {
        let length = rng.below(200) as usize;
        let mut bytes: Vec<u8> = (0..length).map(|_| rng.next() as u8).collect();
        if rng.below(2) == 0 {
            // Mostly-printable input reaches deeper into the parsers.
            for b in &mut bytes {
                *b = b"{}[]:,\"'&*!- \nab01yes"[(*b as usize) % 20];
            }
        }
        for content_type in ["application/json", "application/yaml", "text/plain"] {
            let _ = crate::object::decode_body(content_type, &bytes);
        }
    }
}

#[test]
fn strategic_merge_and_json_patches_never_panic() {
    let mut rng = Rng(0x5eed_0002);
    for _ in 0..5000 {
        let original = value(&mut rng, 4);
        let patch = value(&mut rng, 4);
        let _ = crate::smp::apply(&original, &patch);
        let operations = json!([{"op": rng.pick(&["add", "remove", "replace", "move", "copy", "test"]),
                                 "path": rng.pick(&["/a", "/spec/containers/0", "/-", "", "/metadata/labels/x"]),
                                 "from": "/a", "value": value(&mut rng, 2)}]);
        if let Ok(operations) = serde_json::from_value::<json_patch::Patch>(operations) {
            let mut target = original.clone();
            let _ = json_patch::patch(&mut target, &operations);
        }
    }
}

#[test]
fn field_sets_survive_their_fields_v1_encoding() {
    let mut rng = Rng(0x5eed_0003);
    for _ in 0..3000 {
        let object = value(&mut rng, 5);
        let set = crate::fields::field_set(&object);
        let encoded = crate::fields::to_fields_v1(&set);
        assert_eq!(crate::fields::from_fields_v1(&encoded), set, "object {object}");
        for path in &set {
            let mut copy = object.clone();
            crate::fields::remove(&mut copy, path);
            let _ = crate::fields::get(&copy, path);
        }
    }
}
