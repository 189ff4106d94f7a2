//! Attacks on a real cluster that the hardening closes: each test runs the attack against real
//! node processes and checks that it fails and changes nothing.

mod common;

use std::time::Duration;

use common::*;
use ephemera_client::{pb, Client, ClientError, TlsFiles};
use tonic::Code;

fn code(e: &ClientError) -> Code {
    e.code()
        .unwrap_or_else(|| panic!("expected a status, got {e}"))
}

fn init_request() -> pb::InitClusterRequest {
    pb::InitClusterRequest {
        policy_approvals: Some(0),
        ..Default::default()
    }
}

async fn try_init(c: &Client) -> Result<pb::InitClusterResponse, ClientError> {
    c.admin_call(
        init_request(),
        |mut a, r| async move { a.init_cluster(r).await },
    )
    .await
}

/// Whoever reaches a fresh node first does not win the cluster: init without the node's init
/// secret (no credential, a workload's certificate, a guessed secret) is refused and leaves the
/// node uninitialised; a node configured to join refuses init even with its secret; the holder
/// of the secret initialises, and the spent secret's file is gone.
#[test]
fn init_needs_proof_of_control_of_the_node() {
    let mut cluster = DevCluster::start(1, &[]);
    let (fresh_api, _) = cluster.start_new_node(2);
    let (joiner_api, _) = cluster.start_new_node_with(3, "\n[bootstrap]\njoin = true\n");
    let secret_file = cluster.dir.path().join("node-2/data/init.secret");
    let secret = std::fs::read_to_string(&secret_file)
        .expect("an uninitialised node writes its init secret")
        .trim()
        .to_string();
    assert!(!cluster.dir.path().join("node-3/data/init.secret").exists());
    let tls_as = |identity: Option<&str>| TlsFiles {
        ca_pem: cluster.pki("ca.crt"),
        identity: identity.map(|i| {
            (
                cluster.pki(&format!("{i}.crt")),
                cluster.pki(&format!("{i}.key")),
            )
        }),
    };
    let at = |api: &str, bearer: Option<&str>, identity: Option<&str>| {
        Client::with_tls(api, bearer.map(str::to_string), Some(&tls_as(identity)))
            .unwrap()
            .with_timeout(Duration::from_secs(10))
    };
    rt().block_on(async {
        let anonymous = try_init(&at(&fresh_api, None, None)).await.unwrap_err();
        assert_eq!(code(&anonymous), Code::Unauthenticated, "{anonymous}");
        assert!(
            anonymous.to_string().contains("init.secret"),
            "the refusal says where the secret is: {anonymous}"
        );
        let workload = try_init(&at(&fresh_api, None, Some("workload")))
            .await
            .unwrap_err();
        assert_eq!(code(&workload), Code::Unauthenticated, "{workload}");
        let guessed = format!("eph_init_{}", "A".repeat(43));
        let wrong = try_init(&at(&fresh_api, Some(&guessed), None))
            .await
            .unwrap_err();
        assert_eq!(code(&wrong), Code::Unauthenticated, "{wrong}");
        // Another node's secret is no proof of control of this one.
        let joiner = try_init(&at(&joiner_api, Some(&secret), Some("admin")))
            .await
            .unwrap_err();
        assert_eq!(code(&joiner), Code::PermissionDenied, "{joiner}");
        assert!(joiner.to_string().contains("join"), "{joiner}");

        // None of that initialised anything: the node still has no leader and no policy.
        assert!(secret_file.exists());
        let st = at(&fresh_api, None, Some("admin"))
            .admin_call(pb::ClusterStatusRequest {}, |mut a, r| async move {
                a.get_cluster_status(r).await
            })
            .await;
        assert!(
            st.is_err() || st.as_ref().unwrap().leader_id == 0,
            "refused inits changed the node: {st:?}"
        );

        let init = try_init(&at(&fresh_api, Some(&secret), None))
            .await
            .expect("the init secret's holder initialises the node");
        assert!(init.admin_token.starts_with("eph_admin_"));
        assert!(!secret_file.exists(), "the spent init secret is deleted");
        let again = try_init(&at(&fresh_api, Some(&secret), None))
            .await
            .unwrap_err();
        assert_eq!(code(&again), Code::AlreadyExists, "{again}");
    });
}
