use super::*;

fn now() -> SystemTime {
    SystemTime::now()
}

fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap())
}

fn bundles(cas: &[&Ca]) -> TrustBundles {
    let mut b = TrustBundles::default();
    for ca in cas {
        b.add(ca.trust_domain(), ca.cert_pem()).unwrap();
    }
    b
}

/// A leaf signed by `ca` with arbitrary URI SANs, for the malformed cases.
fn leaf_with_uris(ca: &Ca, uris: &[&str]) -> Vec<CertificateDer<'static>> {
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params
        .subject_alt_names
        .push(SanType::DnsName("w.example".try_into().unwrap()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    vec![cert.der().clone()]
}

fn chain(issued: &Issued) -> Vec<CertificateDer<'static>> {
    parse_certs(&issued.cert_pem).unwrap()
}

#[test]
fn spiffe_ids_parse_strictly() {
    let id = SpiffeId::parse("spiffe://example.org/ns/ci/sa/runner").unwrap();
    assert_eq!(id.trust_domain, "example.org");
    assert_eq!(id.to_string(), "spiffe://example.org/ns/ci/sa/runner");
    assert_eq!(SpiffeId::node("td", 7).node_id(), Some(7));
    for bad in [
        "http://example.org/x",
        "spiffe://Example.org/x",
        "spiffe:///x",
        "spiffe://example.org",
        "spiffe://example.org/a//b",
        "spiffe://example.org/a/../b",
        "spiffe://example.org/a?b",
        "spiffe://user@example.org/x",
    ] {
        assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn svids_verify_against_their_own_trust_domain_only() {
    let t = now();
    let ours = Ca::generate("ours.test", t, Duration::from_secs(3600)).unwrap();
    let theirs = Ca::generate("theirs.test", t, Duration::from_secs(3600)).unwrap();
    let b = bundles(&[&ours]);
    let id = SpiffeId::parse("spiffe://ours.test/workload/web").unwrap();
    let good = ours
        .issue(&id, LeafUse::Client, &[], &[], t, Duration::from_secs(600))
        .unwrap();
    assert_eq!(
        b.verify_svid(&chain(&good), Usage::Client, unix(t))
            .unwrap(),
        id
    );
    // A client-only SVID cannot act as a server.
    assert!(matches!(
        b.verify_svid(&chain(&good), Usage::Server, unix(t)),
        Err(PkiError::WrongUsage(_))
    ));

    // Expired (and not yet valid).
    assert_eq!(
        b.verify_svid(
            &chain(&good),
            Usage::Client,
            unix(t + Duration::from_secs(700))
        ),
        Err(PkiError::Expired)
    );
    // Untrusted trust domain.
    let other_id = SpiffeId::parse("spiffe://theirs.test/w").unwrap();
    let foreign = theirs
        .issue(
            &other_id,
            LeafUse::Client,
            &[],
            &[],
            t,
            Duration::from_secs(600),
        )
        .unwrap();
    assert_eq!(
        b.verify_svid(&chain(&foreign), Usage::Client, unix(t)),
        Err(PkiError::UntrustedDomain("theirs.test".into()))
    );
    // A root of one domain cannot vouch for an identity in another.
    let both = bundles(&[&ours, &theirs]);
    let forged = leaf_with_uris(&theirs, &["spiffe://ours.test/workload/web"]);
    assert_eq!(
        both.verify_svid(&forged, Usage::Client, unix(t)),
        Err(PkiError::UntrustedIssuer("ours.test".into()))
    );
    // Untrusted CA claiming our domain.
    let rogue = Ca::generate("ours.test", t, Duration::from_secs(3600)).unwrap();
    let rogue_leaf = rogue
        .issue(&id, LeafUse::Client, &[], &[], t, Duration::from_secs(600))
        .unwrap();
    assert_eq!(
        b.verify_svid(&chain(&rogue_leaf), Usage::Client, unix(t)),
        Err(PkiError::UntrustedIssuer("ours.test".into()))
    );
    // No URI SAN, two URI SANs, a non-SPIFFE URI.
    assert_eq!(
        b.verify_svid(&leaf_with_uris(&ours, &[]), Usage::Client, unix(t)),
        Err(PkiError::NoSpiffeId)
    );
    assert_eq!(
        b.verify_svid(
            &leaf_with_uris(&ours, &["spiffe://ours.test/a", "spiffe://ours.test/b"]),
            Usage::Client,
            unix(t)
        ),
        Err(PkiError::SeveralUriSans(2))
    );
    assert!(matches!(
        b.verify_svid(
            &leaf_with_uris(&ours, &["https://ours.test/a"]),
            Usage::Client,
            unix(t)
        ),
        Err(PkiError::BadSpiffeId(..))
    ));
    // A CA certificate is not an SVID.
    assert_eq!(
        b.verify_svid(
            &parse_certs(ours.cert_pem()).unwrap(),
            Usage::Client,
            unix(t)
        ),
        Err(PkiError::IsCa)
    );
}

#[test]
fn a_ca_reloaded_from_pem_issues_verifiable_certificates() {
    let t = now();
    let ed = Ca::generate_with(
        KeyAlgorithm::Ed25519,
        "ours.test",
        t,
        Duration::from_secs(3600),
    )
    .unwrap();
    // An Ed25519 key as PKCS#8 v1 (version 0, 48 bytes), which OpenSSL 3.0 and curl read.
    let ed_pem = ed.key_pem().unwrap();
    assert!(
        ed_pem.contains("MC4CAQAwBQYDK2VwBCIEI"),
        "{}",
        &ed_pem[..60]
    );
    let ed_leaf = Ca::from_pem("ours.test", ed.cert_pem(), &ed_pem)
        .unwrap()
        .issue(
            &SpiffeId::node("ours.test", 1),
            LeafUse::Node,
            &[],
            &[],
            t,
            Duration::from_secs(60),
        )
        .unwrap();
    Identity::from_pem(&ed_leaf.cert_pem, &ed_leaf.key_pem).unwrap();
    // The default is ECDSA P-256, for gRPC core and browsers.
    let ca = Ca::generate("ours.test", t, Duration::from_secs(3600)).unwrap();
    assert_eq!(ca.key_algorithm(), KeyAlgorithm::EcdsaP256);
    let key_pem = ca.key_pem().unwrap();
    let reloaded = Ca::from_pem("ours.test", ca.cert_pem(), &key_pem).unwrap();
    let id = SpiffeId::node("ours.test", 2);
    let node = reloaded
        .issue(
            &id,
            LeafUse::Node,
            &["localhost"],
            &["127.0.0.1".parse().unwrap()],
            t,
            Duration::from_secs(600),
        )
        .unwrap();
    let b = bundles(&[&ca]);
    assert_eq!(
        b.verify_svid(&chain(&node), Usage::Server, unix(t))
            .unwrap(),
        id
    );
    assert_eq!(
        b.verify_svid(&chain(&node), Usage::Client, unix(t))
            .unwrap(),
        id
    );
    assert!(!format!("{node:?}").contains("PRIVATE"));
    // The leaf key loads in rustls and signs: the identity it belongs to verifies.
    Identity::from_pem(&node.cert_pem, &node.key_pem).unwrap();
}

#[test]
fn csr_signing_is_deterministic_and_yields_a_verifiable_svid() {
    let t = now();
    let ca = Ca::generate("ours.test", t, Duration::from_secs(3600)).unwrap();
    let secret = ca_key_secret(&ca.key_pem().unwrap()).unwrap();
    let rebuilt = Ca::from_secret("ours.test", ca.cert_pem(), &secret).unwrap();
    let id = SpiffeId::parse("spiffe://ours.test/ci/job").unwrap();
    let req = new_csr(Some(&id)).unwrap();
    let parsed = parse_csr(&req.cert_pem).unwrap();
    assert_eq!(parsed.spiffe_id.as_ref(), Some(&id));
    // The first layout stored whole CSRs; its decode path finds the same key in them.
    assert_eq!(
        ephemera_core::legacy::csr_public_key(&parsed.der).as_deref(),
        Some(parsed.spki_der.as_slice())
    );
    let serial = [0x01, 0xaa, 0xbb];
    let nb = SystemTime::UNIX_EPOCH
        + Duration::from_secs(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs());
    let a = ca
        .sign_public_key(
            &parsed.spki_der,
            &id,
            &serial,
            nb,
            nb + Duration::from_secs(600),
        )
        .unwrap();
    let b = rebuilt
        .sign_public_key(
            &parsed.spki_der,
            &id,
            &serial,
            nb,
            nb + Duration::from_secs(600),
        )
        .unwrap();
    assert_eq!(
        a, b,
        "the same lease must give the same certificate on every node"
    );
    let chain = parse_certs(&a).unwrap();
    assert_eq!(serial_of(&chain[0]).unwrap(), serial.to_vec());
    let bundle = bundles(&[&ca]);
    assert_eq!(
        bundle.verify_svid(&chain, Usage::Client, unix(t)).unwrap(),
        id
    );
    Identity::from_pem(&a, &req.key_pem).unwrap();
    // A CSR without a SPIFFE ID is accepted (the issuer decides the ID); a tampered one is not.
    assert_eq!(
        parse_csr(&new_csr(None).unwrap().cert_pem)
            .unwrap()
            .spiffe_id,
        None
    );
    let mut tampered = req.cert_pem.clone().into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    assert!(parse_csr(std::str::from_utf8(&tampered).unwrap()).is_err());
}

#[test]
fn a_renewed_node_certificate_keeps_its_host_names_and_replaces_the_live_identity() {
    let now = SystemTime::now();
    let ca = Ca::generate("td", now, Duration::from_secs(3600)).unwrap();
    let id = SpiffeId::node("td", 2);
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let first = ca
        .issue(
            &id,
            LeafUse::Node,
            &["localhost"],
            &[ip],
            now,
            Duration::from_secs(600),
        )
        .unwrap();
    let live = Identity::from_pem(&first.cert_pem, &first.key_pem).unwrap();
    let shared = live.clone();
    let (dns, ips) = host_names_of(&live.chain()[0]).unwrap();
    assert_eq!(
        (dns.clone(), ips.clone()),
        (vec!["localhost".to_string()], vec![ip])
    );

    let (spki, key_pem) = new_key(ca.key_algorithm()).unwrap();
    let nb = now - Duration::from_secs(60);
    let renewed = ca
        .sign_key_for_hosts(
            &spki,
            &id,
            (&dns, &ips),
            &[7; 16],
            nb,
            now + Duration::from_secs(30),
        )
        .unwrap();
    shared.replace(&renewed, &key_pem).unwrap();
    // Every clone presents the new certificate; its host names and identity are unchanged.
    let leaf = live.chain()[0].clone();
    assert_eq!(serial_of(&leaf).unwrap(), vec![7; 16]);
    assert_eq!(host_names_of(&leaf).unwrap(), (dns, ips));
    let (from, until) = validity_unix_s(&leaf).unwrap();
    assert_eq!(until - from, 90);
    let mut bundles = TrustBundles::default();
    bundles.add("td", ca.cert_pem()).unwrap();
    let chain = live.chain();
    assert_eq!(
        bundles
            .verify_svid(&chain, Usage::Server, UnixTime::now())
            .unwrap(),
        id
    );

    // Another node's certificate, or a key that is not the certificate's, changes nothing.
    let other = ca
        .issue(
            &SpiffeId::node("td", 3),
            LeafUse::Node,
            &[],
            &[],
            now,
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(matches!(
        live.replace(&other.cert_pem, &other.key_pem),
        Err(PkiError::WrongIdentity { .. })
    ));
    assert!(live.replace(&first.cert_pem, &key_pem).is_err());
    assert_eq!(serial_of(&live.chain()[0]).unwrap(), vec![7; 16]);
}
