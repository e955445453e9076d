use super::*;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn roots(seeds: &[u8], threshold: u64) -> Roots {
    Roots::new(seeds.iter().map(|s| key(*s).verifying_key()), threshold).unwrap()
}

fn grant(seed: u8) -> KeyGrant {
    KeyGrant {
        key: Fixed(key(seed).verifying_key().to_bytes()),
        modules: None,
        groups: None,
        not_after: None,
    }
}

fn payload(version: u64) -> TrustPayload {
    TrustPayload {
        version,
        issued_at: 1_000,
        expires_at: None,
        keys: vec![grant(10)],
        revoked: vec![],
        seq_resets: vec![],
        roots: None,
    }
}

fn signed(p: &TrustPayload, seeds: &[u8]) -> Vec<u8> {
    let keys: Vec<SigningKey> = seeds.iter().map(|s| key(*s)).collect();
    sign(p, &keys).unwrap()
}

fn kid(seed: u8) -> KeyId {
    KeyId::of(&key(seed).verifying_key())
}

#[test]
fn a_document_signed_by_the_threshold_is_accepted() {
    let doc = signed(&payload(1), &[1, 2]);
    let a = verify(&doc, &roots(&[1, 2, 3], 2), 0, 2_000).unwrap();
    assert_eq!(a.policy.version, 1);
    assert!(!a.rotated);
    assert_eq!(a.signers.len(), 2);
    assert!(a.policy.key(&kid(10)).is_ok());
    assert_eq!(Policy::from_accepted(&doc).unwrap(), a.policy);
}

#[test]
fn one_root_of_two_needed_is_refused() {
    let doc = signed(&payload(1), &[1]);
    let err = verify(&doc, &roots(&[1, 2, 3], 2), 0, 2_000).unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::BelowThreshold {
                have: 1,
                need: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn the_same_root_signing_twice_is_refused() {
    // sign() refuses it, so build the document by hand: two signatures by root 1.
    let p = payload(1);
    let body = HeaderBuilder::new()
        .content_type(CONTENT_TYPE.to_string())
        .build();
    let mut b = CoseSignBuilder::new().protected(body).payload(p.to_cbor());
    for _ in 0..2 {
        let h = HeaderBuilder::new()
            .algorithm(iana::Algorithm::EdDSA)
            .key_id(kid(1).0.to_vec())
            .build();
        let sig = CoseSignatureBuilder::new().protected(h).build();
        b = b.add_created_signature(sig, &[], |tbs| key(1).sign(tbs).to_bytes().to_vec());
    }
    let doc = b.build().to_tagged_vec().unwrap();
    let err = verify(&doc, &roots(&[1, 2, 3], 2), 0, 2_000).unwrap_err();
    assert_eq!(err, TrustError::DuplicateSigner(kid(1)));
    assert!(sign(&p, &[key(1), key(1)]).is_err());
}

#[test]
fn signatures_by_other_keys_do_not_count_and_a_bad_root_signature_refuses() {
    let doc = signed(&payload(1), &[1, 9]);
    assert!(matches!(
        verify(&doc, &roots(&[1, 2, 3], 2), 0, 2_000),
        Err(TrustError::BelowThreshold { have: 1, .. })
    ));
    // Root 2's signature replaced by root 3's bytes: named 2, does not verify.
    let mut sign = parse(&signed(&payload(1), &[1, 2])).unwrap();
    let other = parse(&signed(&payload(1), &[3])).unwrap();
    sign.signatures[1].signature = other.signatures[0].signature.clone();
    let doc = sign.to_tagged_vec().unwrap();
    assert_eq!(
        verify(&doc, &roots(&[1, 2, 3], 2), 0, 2_000).unwrap_err(),
        TrustError::BadSignature(kid(2))
    );
}

#[test]
fn a_version_not_above_the_current_one_is_refused() {
    let doc = signed(&payload(3), &[1, 2]);
    let r = roots(&[1, 2, 3], 2);
    assert!(verify(&doc, &r, 2, 2_000).is_ok());
    for current in [3, 4] {
        assert!(matches!(
            verify(&doc, &r, current, 2_000),
            Err(TrustError::VersionNotNewer { version: 3, .. })
        ));
    }
}

#[test]
fn an_expired_document_is_refused_and_expiry_stops_every_key() {
    let mut p = payload(1);
    p.expires_at = Some(5_000);
    let doc = signed(&p, &[1, 2]);
    let r = roots(&[1, 2, 3], 2);
    assert!(matches!(
        verify(&doc, &r, 0, 5_000),
        Err(TrustError::Expired { .. })
    ));
    let a = verify(&doc, &r, 0, 4_999).unwrap();
    assert!(a.policy.admit(&kid(10), "x", &[], 4_999).is_ok());
    assert!(matches!(
        a.policy.admit(&kid(10), "x", &[], 5_000),
        Err(KeyRefusal::DocumentExpired { .. })
    ));
}

#[test]
fn a_root_rotation_needs_both_thresholds() {
    let mut p = payload(2);
    p.roots = Some(roots(&[4, 5, 6], 2).to_wire());
    let old = roots(&[1, 2, 3], 2);
    // Old roots only.
    let err = verify(&signed(&p, &[1, 2]), &old, 1, 2_000).unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::RotationBelowThreshold {
                have: 0,
                need: 2,
                ..
            }
        ),
        "{err}"
    );
    // New roots only.
    let err = verify(&signed(&p, &[4, 5, 6]), &old, 1, 2_000).unwrap_err();
    assert!(
        matches!(err, TrustError::BelowThreshold { have: 0, .. }),
        "{err}"
    );
    // Two old and one new.
    assert!(matches!(
        verify(&signed(&p, &[1, 2, 4]), &old, 1, 2_000),
        Err(TrustError::RotationBelowThreshold { have: 1, .. })
    ));
    // Both.
    let a = verify(&signed(&p, &[1, 3, 4, 6]), &old, 1, 2_000).unwrap();
    assert!(a.rotated);
    assert_eq!(a.roots, roots(&[4, 5, 6], 2));
    // The next document needs the new roots.
    let next = signed(&payload(3), &[1, 2]);
    assert!(verify(&next, &a.roots, 2, 2_000).is_err());
    assert!(verify(&signed(&payload(3), &[5, 6]), &a.roots, 2, 2_000).is_ok());
}

#[test]
fn scopes_limit_modules_groups_and_time() {
    let mut p = payload(1);
    p.keys = vec![
        KeyGrant {
            modules: Some(vec!["sensor-*".into()]),
            ..grant(10)
        },
        KeyGrant {
            groups: Some(vec!["lab".into()]),
            not_after: Some(3_000),
            ..grant(11)
        },
    ];
    p.revoked = vec![Fixed(kid(12).0)];
    let pol = Policy::from_payload(&p).unwrap();
    let lab = vec!["lab".to_string()];
    assert!(pol.admit(&kid(10), "sensor-bme280", &[], 0).is_ok());
    assert!(matches!(
        pol.admit(&kid(10), "blinky", &[], 0),
        Err(KeyRefusal::ModuleOutOfScope { .. })
    ));
    assert!(pol.admit(&kid(11), "blinky", &lab, 2_999).is_ok());
    assert!(matches!(
        pol.admit(&kid(11), "blinky", &["barn".to_string()], 0),
        Err(KeyRefusal::GroupOutOfScope { .. })
    ));
    assert!(matches!(
        pol.admit(&kid(11), "blinky", &lab, 3_000),
        Err(KeyRefusal::KeyExpired { .. })
    ));
    assert!(matches!(
        pol.admit(&kid(12), "blinky", &lab, 0),
        Err(KeyRefusal::Revoked { .. })
    ));
    assert!(matches!(
        pol.admit(&kid(13), "blinky", &lab, 0),
        Err(KeyRefusal::Unknown { .. })
    ));
}

#[test]
fn contradictory_or_malformed_payloads_are_refused() {
    let mut p = payload(1);
    p.revoked = vec![Fixed(kid(10).0)];
    assert!(matches!(
        Policy::from_payload(&p),
        Err(TrustError::BadPolicy(_))
    ));
    let mut p = payload(1);
    p.keys.push(grant(10));
    assert!(Policy::from_payload(&p).is_err());
    let mut p = payload(1);
    p.keys[0].modules = Some(vec![]);
    assert!(Policy::from_payload(&p).is_err());
    let mut p = payload(1);
    p.keys[0].modules = Some(vec!["Bad_Name".into()]);
    assert!(Policy::from_payload(&p).is_err());
    let mut p = payload(0);
    p.keys.clear();
    assert!(Policy::from_payload(&p).is_err());
    let mut p = payload(1);
    p.roots = Some(RootKeys {
        keys: vec![Fixed(key(1).verifying_key().to_bytes())],
        threshold: 2,
    });
    assert!(matches!(
        Policy::from_payload(&p),
        Err(TrustError::BadRoots(_))
    ));
}

#[test]
fn globs_match_as_documented() {
    for (p, n, m) in [
        ("sensor-*", "sensor-a", true),
        ("sensor-*", "sensor-", true),
        ("sensor-*", "sensor", false),
        ("*", "anything", true),
        ("*-probe", "bme-probe", true),
        ("a*b*c", "aXXbYYc", true),
        ("a*b*c", "aXXbYY", false),
        ("blinky", "blinky", true),
        ("blinky", "blinky2", false),
    ] {
        assert_eq!(glob(p, n), m, "{p} {n}");
    }
}

#[test]
fn a_non_canonical_payload_is_refused() {
    // The version as a two-byte integer head (0x19 0x0001) instead of 0x01.
    let p = payload(1);
    let bytes = p.to_cbor();
    let i = bytes.windows(8).position(|w| w == b"version\x01").unwrap();
    let mut longer = bytes[..i + 7].to_vec();
    longer.extend([0x19, 0x00, 0x01]);
    longer.extend(&bytes[i + 8..]);
    assert!(matches!(
        TrustPayload::from_cbor(&longer),
        Err(TrustError::NotCanonical { .. })
    ));
}

#[test]
fn a_bundle_signature_is_not_a_trust_document() {
    let m = crate::core::manifest::Manifest::from_toml("name = \"m\"\nversion = \"1\"\nseq = 1\n")
        .unwrap();
    let b = crate::core::bundle::sign(m, Some(b"\0asm\x01\0\0\0"), &key(1), 1 << 20).unwrap();
    assert!(verify(&b, &roots(&[1], 1), 0, 0).is_err());
}

#[test]
fn every_field_survives_signing_and_the_devices_reader() {
    // edgectl encodes with serde, the device reads field by field: they must agree.
    let mut p = payload(7);
    p.expires_at = Some(9_000);
    p.keys = vec![
        KeyGrant {
            modules: Some(vec!["sensor-*".into(), "blinky".into()]),
            groups: Some(vec!["lab".into()]),
            not_after: Some(8_000),
            ..grant(10)
        },
        grant(11),
    ];
    p.revoked = vec![Fixed(kid(12).0), Fixed(kid(13).0)];
    p.seq_resets = vec![SeqReset {
        module: "sensor-a".into(),
        seq: 41,
    }];
    p.roots = Some(roots(&[4, 5, 6], 2).to_wire());
    assert_eq!(TrustPayload::from_cbor(&p.to_cbor()).unwrap(), p);
    let a = verify(&signed(&p, &[1, 2, 4, 5]), &roots(&[1, 2, 3], 2), 0, 2_000).unwrap();
    assert_eq!(a.policy.seq_resets, p.seq_resets);
    assert!(a.policy.is_revoked(&kid(13)));
    assert_eq!(
        TrustPayload::from_cbor(&payload(1).to_cbor()).unwrap(),
        payload(1)
    );
}

#[test]
fn keys_out_of_order_unknown_or_empty_lists_written_out_are_refused() {
    use coset::cbor::Value;
    let value = |p: &TrustPayload| Value::from_slice(&p.to_cbor()).unwrap();
    let encode = |v: Value| v.to_vec().unwrap();
    // version and issued_at swapped.
    let Value::Map(mut m) = value(&payload(1)) else {
        unreachable!()
    };
    m.swap(0, 1);
    assert!(TrustPayload::from_cbor(&encode(Value::Map(m))).is_err());
    // An unknown key.
    let Value::Map(mut m) = value(&payload(1)) else {
        unreachable!()
    };
    m.push((Value::Text("extra".into()), Value::Integer(1.into())));
    assert!(TrustPayload::from_cbor(&encode(Value::Map(m))).is_err());
    // An empty revoked list written out.
    let Value::Map(mut m) = value(&payload(1)) else {
        unreachable!()
    };
    m.push((Value::Text("revoked".into()), Value::Array(vec![])));
    assert!(TrustPayload::from_cbor(&encode(Value::Map(m))).is_err());
    // A negative version.
    let Value::Map(mut m) = value(&payload(1)) else {
        unreachable!()
    };
    m[0].1 = Value::Integer((-1).into());
    assert!(TrustPayload::from_cbor(&encode(Value::Map(m))).is_err());
}
