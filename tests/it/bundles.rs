//! Bundle verification over fixture bundles: valid, tampered, wrong key, old sequence, expired,
//! malformed. Table-driven, plus a property test that no single changed byte is accepted.

use coset::iana;
use edge_agent::core::bundle::{self, ContainerError};
use edge_agent::core::manifest::{Action, ManifestProblem, SEQ_MAX, Sha256, Targets, WasmRef};
use edge_agent::core::verify::{DeviceIdentity, VerifyError};
use proptest::prelude::*;

use crate::support::{self, Raw, key, manifest, signed, tiny_wasm, verifier};

const NOW: u64 = 1_800_000_000;

type Check = fn(&VerifyError) -> bool;

struct Case {
    name: &'static str,
    bundle: Vec<u8>,
    installed_seq: Option<u64>,
    expect: Result<(), Check>,
}

fn case(name: &'static str, bundle: Vec<u8>, expect: Check) -> Case {
    Case {
        name,
        bundle,
        installed_seq: None,
        expect: Err(expect),
    }
}

fn cases() -> Vec<Case> {
    let k = key(1);
    let stranger = key(2);
    let wasm = tiny_wasm();
    let valid = signed(manifest("heartbeat", 5), &wasm, &k);

    let mut wasm_byte_changed = valid.clone();
    let last = wasm_byte_changed.len() - 1;
    wasm_byte_changed[last] ^= 0x01;

    // A byte of the manifest (inside the signed payload): the module name's first letter.
    let mut manifest_byte_changed = valid.clone();
    let at = valid
        .windows(9)
        .position(|w| w == b"heartbeat")
        .expect("name in payload");
    manifest_byte_changed[at] = b'j';

    let mut expired = manifest("heartbeat", 5);
    expired.expires_at = Some(NOW - 1);
    let mut not_yet_expired = manifest("heartbeat", 5);
    not_yet_expired.expires_at = Some(NOW + 60);

    let mut bad_name = manifest("heartbeat", 5);
    bad_name.name = "Heart_Beat".into();

    let mut wrong_size = manifest("heartbeat", 5);
    wrong_size.wasm = Some(WasmRef {
        sha256: Sha256::of(&wasm),
        size: wasm.len() as u64 + 1,
    });

    let mut elsewhere = manifest("heartbeat", 5);
    elsewhere.targets = Some(Targets {
        devices: vec!["pi-7".into()],
        groups: vec!["barn".into()],
    });
    let mut for_my_group = elsewhere.clone();
    for_my_group.targets = Some(Targets {
        devices: vec![],
        groups: vec!["greenhouse".into()],
    });

    let mut removal = manifest("heartbeat", 6);
    removal.action = Action::Remove;
    let mut removal_at_max = removal.clone();
    removal_at_max.seq = SEQ_MAX;

    let not_wasm = b"#!/bin/sh\necho not wasm\n".to_vec();
    let mut broken_wasm = wasm.clone();
    broken_wasm.truncate(wasm.len() - 3);

    let mut huge = vec![0x83, 0x01, 0x5b];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());

    let mut trailing = valid.clone();
    trailing.push(0);
    // Format 2 is the chunked container (two items): 3 is a version no agent reads.
    let mut version3 = valid.clone();
    version3[1] = 0x03;
    let mut three_items_as_format2 = valid.clone();
    three_items_as_format2[1] = 0x02;

    let mut seq_equal = case("seq equal to installed", valid.clone(), |e| {
        matches!(
            e,
            VerifyError::SeqNotGreater {
                seq: 5,
                installed: 5,
                ..
            }
        )
    });
    seq_equal.installed_seq = Some(5);
    let mut seq_lower = case("seq lower than installed", valid.clone(), |e| {
        matches!(
            e,
            VerifyError::SeqNotGreater {
                seq: 5,
                installed: 9,
                ..
            }
        )
    });
    seq_lower.installed_seq = Some(9);
    let upgrade = Case {
        name: "seq above installed",
        bundle: valid.clone(),
        installed_seq: Some(4),
        expect: Ok(()),
    };

    vec![
        Case {
            name: "valid",
            bundle: valid.clone(),
            installed_seq: None,
            expect: Ok(()),
        },
        upgrade,
        Case {
            name: "not yet expired",
            bundle: signed(not_yet_expired, &wasm, &k),
            installed_seq: None,
            expect: Ok(()),
        },
        Case {
            name: "targets one of the device's groups",
            bundle: signed(for_my_group, &wasm, &k),
            installed_seq: None,
            expect: Ok(()),
        },
        Case {
            name: "signed removal",
            bundle: Raw::new(removal.clone(), None, &k).build(),
            installed_seq: Some(5),
            expect: Ok(()),
        },
        case("a changed Wasm byte", wasm_byte_changed, |e| {
            matches!(e, VerifyError::WasmHashMismatch { .. })
        }),
        case("a changed manifest byte", manifest_byte_changed, |e| {
            matches!(e, VerifyError::BadSignature { .. })
        }),
        case(
            "signed by an untrusted key",
            signed(manifest("heartbeat", 5), &wasm, &stranger),
            |e| matches!(e, VerifyError::UnknownKey { .. }),
        ),
        case(
            "signed by another key under a trusted kid",
            {
                let mut raw = Raw::new(manifest("heartbeat", 5), Some(&wasm), &stranger);
                raw.kid = Some(
                    edge_agent::core::keys::KeyId::of(&k.verifying_key())
                        .0
                        .to_vec(),
                );
                raw.build()
            },
            |e| matches!(e, VerifyError::BadSignature { .. }),
        ),
        case(
            "unknown kid",
            {
                let mut raw = Raw::new(manifest("heartbeat", 5), Some(&wasm), &k);
                raw.kid = Some(vec![0xde, 0xad, 0xbe, 0xef]);
                raw.build()
            },
            |e| matches!(e, VerifyError::UnknownKey { kid, .. } if kid == "deadbeef"),
        ),
        case(
            "no kid",
            {
                let mut raw = Raw::new(manifest("heartbeat", 5), Some(&wasm), &k);
                raw.kid = None;
                raw.build()
            },
            |e| matches!(e, VerifyError::MissingKeyId { .. }),
        ),
        case(
            "another alg",
            {
                let mut raw = Raw::new(manifest("heartbeat", 5), Some(&wasm), &k);
                raw.alg = iana::Algorithm::ES256;
                raw.build()
            },
            |e| matches!(e, VerifyError::Algorithm { .. }),
        ),
        case(
            "something in the unprotected header",
            {
                let mut raw = Raw::new(manifest("heartbeat", 5), Some(&wasm), &k);
                raw.unprotected_kid = true;
                raw.build()
            },
            |e| matches!(e, VerifyError::UnprotectedHeader { .. }),
        ),
        case("expired", signed(expired, &wasm, &k), |e| {
            matches!(e, VerifyError::Expired { .. })
        }),
        seq_equal,
        seq_lower,
        case("truncated", valid[..valid.len() - 10].to_vec(), |e| {
            matches!(e, VerifyError::Container(ContainerError::Truncated(_)))
        }),
        case("empty", Vec::new(), |e| {
            matches!(e, VerifyError::Container(ContainerError::Truncated(_)))
        }),
        case("garbage", b"this is not a bundle at all".to_vec(), |e| {
            matches!(e, VerifyError::Container(ContainerError::NotABundle(_)))
        }),
        case("huge declared length", huge, |e| {
            matches!(
                e,
                VerifyError::Container(ContainerError::LengthOutOfBounds { .. })
            )
        }),
        case("trailing bytes", trailing, |e| {
            matches!(e, VerifyError::Container(ContainerError::TrailingBytes(1)))
        }),
        case("another format version", version3, |e| {
            matches!(
                e,
                VerifyError::Container(ContainerError::UnsupportedFormat(3))
            )
        }),
        case("format 2 with three items", three_items_as_format2, |e| {
            matches!(e, VerifyError::Container(ContainerError::NotABundle(_)))
        }),
        case(
            "too large",
            Raw::new(manifest("heartbeat", 5), Some(&vec![0u8; 5 << 20]), &k).build(),
            |e| matches!(e, VerifyError::Container(ContainerError::TooLarge { .. })),
        ),
        case(
            "bytes that are not Wasm",
            Raw::new(manifest("heartbeat", 5), Some(&not_wasm), &k).build(),
            |e| matches!(e, VerifyError::NotWasm { .. }),
        ),
        case(
            "Wasm that does not validate",
            Raw::new(manifest("heartbeat", 5), Some(&broken_wasm), &k).build(),
            |e| matches!(e, VerifyError::InvalidWasm { .. }),
        ),
        case(
            "Wasm size differs from the manifest",
            Raw::new(wrong_size, Some(&wasm), &k).build(),
            |e| matches!(e, VerifyError::WasmSizeMismatch { .. }),
        ),
        case(
            "bad name",
            Raw::new(bad_name, Some(&wasm), &k).build(),
            |e| matches!(e, VerifyError::Manifest(ManifestProblem::BadName(n)) if n == "Heart_Beat"),
        ),
        case(
            "signed payload is not a manifest",
            {
                let mut raw = Raw::new(manifest("heartbeat", 5), Some(&wasm), &k);
                raw.payload = vec![0x01];
                raw.build()
            },
            |e| matches!(e, VerifyError::ManifestDecode { .. }),
        ),
        case(
            "install without Wasm",
            Raw::new(manifest("heartbeat", 5), None, &k).build(),
            |e| matches!(e, VerifyError::WasmMissing { .. }),
        ),
        case(
            "removal carrying Wasm",
            {
                let mut raw = Raw::new(removal, None, &k);
                raw.wasm = Some(&wasm);
                raw.build()
            },
            |e| matches!(e, VerifyError::WasmUnexpected { .. }),
        ),
        case(
            "targets another device",
            signed(elsewhere, &wasm, &k),
            |e| matches!(e, VerifyError::NotForThisDevice { .. }),
        ),
        case(
            "seq above 2^53",
            {
                let mut m = manifest("heartbeat", 5);
                m.seq = u64::MAX;
                Raw::new(m, Some(&wasm), &k).build()
            },
            |e| {
                matches!(
                    e,
                    VerifyError::Manifest(ManifestProblem::SeqTooLarge { seq: u64::MAX, .. })
                )
            },
        ),
        case(
            "a removal with seq above 2^53",
            {
                let mut m = removal_at_max.clone();
                m.seq = SEQ_MAX + 1;
                Raw::new(m, None, &k).build()
            },
            |e| {
                matches!(
                    e,
                    VerifyError::Manifest(ManifestProblem::SeqTooLarge { .. })
                )
            },
        ),
        case(
            "a non-shortest seq in the signed manifest",
            non_canonical(&wasm, &k, |p| {
                // "seq": 5 as a one-byte head (18 05) instead of 05.
                let at = p.windows(4).position(|w| w == b"\x63seq").unwrap() + 4;
                assert_eq!(p[at], 0x05);
                p.insert(at, 0x18);
            }),
            |e| matches!(e, VerifyError::ManifestNotCanonical { .. }),
        ),
        case(
            "the signed manifest's keys in another order",
            non_canonical(&wasm, &k, |p| {
                let mut map = manifest_map(p);
                map.swap(1, 2);
                *p = encode_map(map);
            }),
            |e| matches!(e, VerifyError::ManifestNotCanonical { .. }),
        ),
        case(
            "a default the canonical form writes left out",
            non_canonical(&wasm, &k, |p| {
                let mut map = manifest_map(p);
                map.retain(|(k, _)| k.as_text() != Some("action"));
                *p = encode_map(map);
            }),
            |e| matches!(e, VerifyError::ManifestNotCanonical { .. }),
        ),
        Case {
            name: "a removal at seq 2^53",
            bundle: Raw::new(removal_at_max, None, &k).build(),
            installed_seq: Some(5),
            expect: Ok(()),
        },
    ]
}

/// A validly signed install of "heartbeat" seq 5 whose manifest bytes `edit` changed before
/// signing.
fn non_canonical(
    wasm: &[u8],
    k: &ed25519_dalek::SigningKey,
    edit: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let mut raw = Raw::new(manifest("heartbeat", 5), Some(wasm), k);
    let canonical = raw.payload.clone();
    edit(&mut raw.payload);
    assert_ne!(raw.payload, canonical);
    let decoded = edge_agent::core::manifest::Manifest::from_cbor(&raw.payload).unwrap();
    assert_eq!(
        decoded.to_cbor(),
        canonical,
        "the edit changes the encoding, not the manifest"
    );
    raw.build()
}

fn manifest_map(payload: &[u8]) -> Vec<(ciborium::Value, ciborium::Value)> {
    ciborium::from_reader::<ciborium::Value, _>(payload)
        .unwrap()
        .into_map()
        .unwrap()
}

fn encode_map(map: Vec<(ciborium::Value, ciborium::Value)>) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(&ciborium::Value::Map(map), &mut out).unwrap();
    out
}

fn device() -> DeviceIdentity {
    DeviceIdentity {
        id: "pi-1".into(),
        groups: vec!["greenhouse".into()],
    }
}

#[test]
fn every_fixture_bundle_gets_its_own_verdict() {
    let v = verifier(&[&key(1)]).for_device(device());
    let mut failures = Vec::new();
    for case in cases() {
        let result = v.verify(&case.bundle, NOW, |name| {
            assert_eq!(
                name, "heartbeat",
                "{}: seq asked for the verified name",
                case.name
            );
            case.installed_seq
        });
        match (&result, &case.expect) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(check)) if check(e) => {
                let msg = e.to_string();
                assert!(!msg.is_empty());
            }
            _ => failures.push(format!("{}: got {result:?}", case.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn only_the_canonical_encoding_of_a_signed_manifest_is_accepted() {
    let wasm = tiny_wasm();
    let k = key(1);
    let v = verifier(&[&k]);
    let canonical = Raw::new(manifest("heartbeat", 5), Some(&wasm), &k).build();
    assert_eq!(canonical, signed(manifest("heartbeat", 5), &wasm, &k));
    v.verify(&canonical, NOW, |_| None).unwrap();

    let non_shortest = non_canonical(&wasm, &k, |p| {
        let at = p.windows(4).position(|w| w == b"\x63seq").unwrap() + 4;
        p.splice(at..at + 1, [0x1b, 0, 0, 0, 0, 0, 0, 0, 5]);
    });
    let err = v.verify(&non_shortest, NOW, |_| None).unwrap_err();
    assert!(
        matches!(err, VerifyError::ManifestNotCanonical { ref module, .. } if module == "heartbeat"),
        "{err}"
    );
    assert!(err.to_string().contains("canonical encoding"), "{err}");

    let reordered = non_canonical(&wasm, &k, |p| {
        let mut map = manifest_map(p);
        map.reverse();
        *p = encode_map(map);
    });
    let err = v.verify(&reordered, NOW, |_| None).unwrap_err();
    assert!(
        matches!(err, VerifyError::ManifestNotCanonical { .. }),
        "{err}"
    );
}

#[test]
fn errors_name_the_module_and_the_reason() {
    let v = verifier(&[&key(1)]);
    let b = signed(manifest("heartbeat", 2), &tiny_wasm(), &key(2));
    let msg = v.verify(&b, NOW, |_| None).unwrap_err().to_string();
    assert!(msg.contains("\"heartbeat\""), "{msg}");
    assert!(msg.contains("does not trust"), "{msg}");
    let b = signed(manifest("heartbeat", 2), &tiny_wasm(), &key(1));
    let msg = v.verify(&b, NOW, |_| Some(3)).unwrap_err().to_string();
    assert!(msg.contains("heartbeat") && msg.contains("seq 2"), "{msg}");
}

#[test]
fn a_verified_bundle_hands_back_its_manifest_and_wasm() {
    let wasm = tiny_wasm();
    let b = signed(manifest("echo", 1), &wasm, &key(1));
    let v = verifier(&[&key(3), &key(1)])
        .verify(&b, NOW, |_| None)
        .unwrap();
    assert_eq!(v.manifest().name, "echo");
    assert_eq!(v.wasm_bytes(), Some(&wasm[..]));
    assert_eq!(
        v.key_id(),
        edge_agent::core::keys::KeyId::of(&key(1).verifying_key())
    );
}

#[test]
fn an_empty_trust_set_refuses_everything() {
    let b = signed(manifest("echo", 1), &tiny_wasm(), &key(1));
    assert!(matches!(
        verifier(&[]).verify(&b, NOW, |_| None),
        Err(VerifyError::UnknownKey { .. })
    ));
}

#[test]
fn the_configured_maximum_bundle_size_is_enforced() {
    let b = signed(manifest("echo", 1), &tiny_wasm(), &key(1));
    let v = verifier(&[&key(1)]).with_max_bundle_bytes(b.len() - 1);
    assert!(matches!(
        v.verify(&b, NOW, |_| None),
        Err(VerifyError::Container(ContainerError::TooLarge { .. }))
    ));
    assert!(bundle::sign(manifest("echo", 1), Some(&tiny_wasm()), &key(1), 10).is_err());
}

fn assert_every_single_byte_change_is_refused(bundle: &[u8]) {
    let v = verifier(&[&key(1)]);
    v.verify(bundle, NOW, |_| None)
        .expect("the original is valid");
    for i in 0..bundle.len() {
        for mask in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff] {
            let mut b = bundle.to_vec();
            b[i] ^= mask;
            assert!(
                v.verify(&b, NOW, |_| None).is_err(),
                "byte {i} xor {mask:#04x} was accepted"
            );
        }
    }
}

#[test]
fn every_bit_flip_of_an_install_bundle_is_refused() {
    assert_every_single_byte_change_is_refused(&signed(
        manifest("heartbeat", 1),
        &tiny_wasm(),
        &key(1),
    ));
}

#[test]
fn every_bit_flip_of_a_removal_bundle_is_refused() {
    let mut m = manifest("heartbeat", 2);
    m.action = Action::Remove;
    let b = bundle::sign(m, None, &key(1), bundle::DEFAULT_MAX_BUNDLE_BYTES).unwrap();
    assert_every_single_byte_change_is_refused(&b);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn changing_any_single_byte_to_any_other_value_is_refused(pos in any::<prop::sample::Index>(), delta in 1u8..=255) {
        thread_local! {
            static FIXTURE: (Vec<u8>, edge_agent::core::verify::Verifier) =
                (signed(manifest("heartbeat", 1), &tiny_wasm(), &key(1)), verifier(&[&key(1)]));
        }
        FIXTURE.with(|(bundle, v)| {
            let mut b = bundle.clone();
            let i = pos.index(b.len());
            b[i] = b[i].wrapping_add(delta);
            prop_assert!(v.verify(&b, NOW, |_| None).is_err(), "byte {} + {} accepted", i, delta);
            Ok(())
        })?;
    }
}

#[test]
fn the_byte_by_byte_example_in_the_protocol_doc_is_what_the_code_produces() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .unwrap();
    let start = doc
        .find("<!-- example-bundle-begin -->")
        .expect("begin marker");
    let end = doc.find("<!-- example-bundle-end -->").expect("end marker");
    let block = &doc[start..end];
    let hex_lines: String = block
        .lines()
        .filter(|l| l.starts_with("    ") || l.starts_with("0"))
        .filter_map(|l| l.split('|').next())
        .collect::<Vec<_>>()
        .join(" ");
    let documented = support::unhex(&hex_lines);
    let produced = example_bundle();
    assert_eq!(
        hex::encode(&documented),
        hex::encode(&produced),
        "docs/protocol.md's example is stale; regenerate it with \
         `cargo test --test it print_example_bundle -- --ignored --nocapture`"
    );
}

/// The example in docs/protocol.md: key seed 0x01, the smallest valid Wasm module, a removal-free
/// install of module "demo".
fn example_bundle() -> Vec<u8> {
    let wasm = b"\0asm\x01\0\0\0".to_vec();
    let m = edge_agent::core::manifest::Manifest::from_toml(
        "name = \"demo\"\nversion = \"1\"\nseq = 1\n[caps]\npublish = [\"t\"]\n",
    )
    .unwrap();
    signed(m, &wasm, &key(1))
}

#[test]
#[ignore = "prints the docs/protocol.md example"]
fn print_example_bundle() {
    let b = example_bundle();
    for chunk in b.chunks(16) {
        println!("    {}", hex::encode(chunk));
    }
}

#[test]
fn the_chunked_example_in_the_protocol_doc_is_what_the_code_produces() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .unwrap();
    let start = doc
        .find("<!-- example-chunked-begin -->")
        .expect("begin marker");
    let end = doc
        .find("<!-- example-chunked-end -->")
        .expect("end marker");
    let hex_lines: String = doc[start..end]
        .lines()
        .filter(|l| l.starts_with("    "))
        .filter_map(|l| l.split('|').next())
        .collect::<Vec<_>>()
        .join(" ");
    let (signed_part, wasm, lengths) = example_chunked();
    assert_eq!(
        hex::encode(support::unhex(&hex_lines)),
        hex::encode(&signed_part),
        "docs/protocol.md's chunked example is stale; regenerate it with \
         `cargo test --test it print_example_chunked -- --ignored --nocapture`"
    );
    // What the doc says about it: a valid signed part whose chunks cut the module.
    let v = verifier(&[&key(1)])
        .verify(&signed_part, NOW, |_| None)
        .unwrap();
    assert!(v.awaits_chunks());
    assert_eq!(
        v.manifest()
            .chunks
            .iter()
            .map(|c| usize::try_from(c.1).unwrap())
            .collect::<Vec<_>>(),
        lengths
    );
    verifier(&[&key(1)])
        .verify_assembled(&signed_part, &wasm, NOW, |_| None)
        .unwrap();
    assert!((2..=3).contains(&lengths.len()), "{lengths:?}");
}

/// The chunked example in docs/protocol.md: key seed 0x01, module "demo" whose Wasm is the
/// 8-byte header and a 700-byte custom section `pad`, cut with an average of 256 bytes; the
/// format 2 signed part `edgectl deploy` publishes for it. Returns it, the Wasm and the lengths.
fn example_chunked() -> (Vec<u8>, Vec<u8>, Vec<usize>) {
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    let mut s: u32 = 1;
    let pad: Vec<u8> = (0..700)
        .map(|_| {
            s = s.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            s.to_be_bytes()[1]
        })
        .collect();
    // Custom section (id 0): size 704 = LEB128 c0 05, name "pad", then the bytes.
    wasm.extend_from_slice(&[0x00, 0xc0, 0x05, 0x03, b'p', b'a', b'd']);
    wasm.extend_from_slice(&pad);
    let lengths = edge_agent::core::chunking::cut(&wasm, 256).unwrap();
    let m = edge_agent::core::manifest::Manifest::from_toml(
        "name = \"demo\"\nversion = \"1\"\nseq = 1\n[caps]\npublish = [\"t\"]\n",
    )
    .unwrap();
    let format1 = bundle::sign_listing_chunks(
        m,
        &wasm,
        &lengths,
        &key(1),
        bundle::DEFAULT_MAX_BUNDLE_BYTES,
    )
    .unwrap();
    let raw = bundle::decode(&format1, format1.len()).unwrap();
    (bundle::encode_chunked(raw.sign1), wasm, lengths)
}

#[test]
#[ignore = "prints the docs/protocol.md chunked example"]
fn print_example_chunked() {
    let (b, wasm, lengths) = example_chunked();
    println!(
        "{} bytes, Wasm {} bytes, chunks {lengths:?}",
        b.len(),
        wasm.len()
    );
    for chunk in b.chunks(16) {
        println!("    {}", hex::encode(chunk));
    }
}
