//! TLS and mTLS over real sockets, with certificates made for the test by rcgen.

#[path = "support/db.rs"]
mod db;

#[path = "support/session.rs"]
mod session;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use airlock_agent::decider::{Connection, Decider};
use airlock_control_plane::{auth::Scope, ControlPlane, Tls};
use airlock_proto::v1::{
    approval_service_client::ApprovalServiceClient, ActionRequest, DecideRequest, Hello, Verdict,
};
use db::TestDb;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca.pem(),
        server: leaf("localhost"),
        client: leaf("host-a"),
    }
}

async fn serve(t: &TestDb, pki: &Pki, mtls: bool) -> (String, String, String) {
    serve_with(t, pki, mtls, Default::default()).await
}

async fn serve_with(
    t: &TestDb,
    pki: &Pki,
    mtls: bool,
    connections: airlock_control_plane::config::Connections,
) -> (String, String, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let store = t.open().await;
    let token = store.create_token("host-a", Scope::Agent).await.unwrap();
    let alice = store.create_token("alice", Scope::Approve).await.unwrap();
    let mut plane = ControlPlane::new(store);
    plane.connections = connections;
    plane.tls = Some(Tls {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: mtls.then(|| pki.ca_pem.clone().into_bytes()),
    });
    tokio::spawn(async move {
        plane.serve(listener, std::future::pending()).await.unwrap();
    });
    (format!("https://localhost:{port}"), token, alice)
}

fn hello() -> Hello {
    Hello {
        host_id: "host-a".into(),
        hostname: "host-a".into(),
        ..Default::default()
    }
}

fn tls(pki: &Pki, with_client_cert: bool) -> ClientTlsConfig {
    let cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem));
    if with_client_cert {
        cfg.identity(Identity::from_pem(&pki.client.0, &pki.client.1))
    } else {
        cfg
    }
}

async fn agent_stream_over_tls(t: TestDb) {
    let pki = pki();
    let (url, token, alice) = serve(&t, &pki, false).await;
    let conn = Connection {
        url: url.clone(),
        token: Some(token.clone()),
        tls: Some(tls(&pki, false)),
    };
    let agent = Decider::spawn_with(conn, hello());
    assert!(
        agent.wait_connected(Duration::from_secs(5)).await,
        "TLS session up"
    );
    let answer = agent.ask(ActionRequest {
        request_id: "t-1".into(),
        deadline_unix_ms: i64::MAX,
        ..Default::default()
    });
    // An approver over TLS decides; the decision comes back over the agent's TLS stream.
    let ch = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(tls(&pki, false))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {alice}").parse().unwrap();
    let mut approvals =
        ApprovalServiceClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    let mut decided = false;
    for _ in 0..100 {
        let vote = DecideRequest {
            request_id: "t-1".into(),
            verdict: Verdict::Allow as i32,
            ..Default::default()
        };
        if approvals.decide(vote).await.is_ok() {
            decided = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(decided);
    let d = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);
}

async fn plain_http_and_an_untrusted_ca_are_refused_in_the_handshake(t: TestDb) {
    let pki = pki();
    let (url, token, _) = serve(&t, &pki, false).await;

    // Plain http to the TLS port: the server's answer to an HTTP/2 preface is a fatal TLS
    // alert (decode_error), and the agent's client fails in its transport, never reaching gRPC.
    let addr = url.replace("https://localhost", "127.0.0.1");
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut record = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut record))
        .await
        .expect("an answer")
        .unwrap();
    // One TLS record: type alert, version 3.3 (as every TLS 1.2 and 1.3 record says), length
    // 2; level fatal, description decode_error.
    const ALERT: u8 = 21;
    const FATAL: u8 = 2;
    const DECODE_ERROR: u8 = 50;
    assert_eq!(record, [ALERT, 3, 3, 0, 2, FATAL, DECODE_ERROR]);
    let plain = Connection {
        url: url.replace("https://", "http://"),
        token: Some(token.clone()),
        tls: None,
    };
    let plain = session::refusal(&plain, hello()).await;
    // Refused in connecting, or (when the server's close wins the race with the request) in
    // the call's own transport: either way below gRPC, with no status from the server.
    let in_transport = std::error::Error::source(&plain)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    assert!(
        plain.message().starts_with("transport error") || in_transport,
        "{plain:?}"
    );

    // TLS trusting another CA: the agent refuses the server's certificate in the handshake.
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    other
        .distinguished_name
        .push(DnType::CommonName, "Someone else's CA");
    let untrusted_ca = other
        .self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    let wrong = Connection {
        url,
        token: Some(token),
        tls: Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(untrusted_ca))),
    };
    let wrong = session::refusal(&wrong, hello()).await;
    assert_eq!(wrong.code(), tonic::Code::Unavailable, "{wrong:?}");
    assert!(
        wrong
            .message()
            .contains("invalid peer certificate: UnknownIssuer"),
        "{wrong:?}"
    );
}

async fn mtls_requires_the_agents_client_certificate(t: TestDb) {
    let pki = pki();
    let (url, token, _) = serve(&t, &pki, true).await;
    let without = Connection {
        url: url.clone(),
        token: Some(token.clone()),
        tls: Some(tls(&pki, false)),
    };
    // The handshake admits a client without a certificate (approvers need none); the agent
    // stream then refuses it.
    let without = session::refusal(&without, hello()).await;
    assert_eq!(without.code(), tonic::Code::Unauthenticated, "{without:?}");
    assert_eq!(
        without.message(),
        "this server requires agents to present a client certificate (mTLS)",
        "token alone is not enough under mTLS"
    );
    let with = Connection {
        url,
        token: Some(token),
        tls: Some(tls(&pki, true)),
    };
    assert!(
        Decider::spawn_with(with, hello())
            .wait_connected(Duration::from_secs(5))
            .await
    );
}

/// A TLS channel to `url` over TCP connections we make, counting them.
async fn counted_tls_channel(
    url: &str,
    tls: ClientTlsConfig,
    made: Arc<AtomicUsize>,
) -> tonic::transport::Channel {
    let addr = url.replace("https://localhost", "127.0.0.1");
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let (addr, made) = (addr.clone(), made.clone());
            async move {
                made.fetch_add(1, Ordering::SeqCst);
                tokio::net::TcpStream::connect(addr)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap()
}

/// Under TLS too, a connection that made an authenticated call keeps its place past the auth
/// time, and one that only asked for health is closed at it (its client connects again).
async fn over_tls_only_authenticated_connections_outlive_the_auth_time(t: TestDb) {
    use airlock_proto::v1::{policy_service_client::PolicyServiceClient, GetPolicyRequest};
    let pki = pki();
    let connections = airlock_control_plane::config::Connections {
        auth_timeout_secs: 1,
        ..Default::default()
    };
    let (url, _, alice) = serve_with(&t, &pki, false, connections).await;

    let approver_made = Arc::new(AtomicUsize::new(0));
    let ch = counted_tls_channel(&url, tls(&pki, false), approver_made.clone()).await;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {alice}").parse().unwrap();
    let mut policy = PolicyServiceClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    let checker_made = Arc::new(AtomicUsize::new(0));
    let ch = counted_tls_channel(&url, tls(&pki, false), checker_made.clone()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);

    policy
        .get(GetPolicyRequest {})
        .await
        .expect("first policy call");
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("first health check");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    policy
        .get(GetPolicyRequest {})
        .await
        .expect("second policy call");
    for _ in 0..20 {
        if health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        approver_made.load(Ordering::SeqCst),
        1,
        "the approver's authenticated TLS connection was closed"
    );
    assert!(
        checker_made.load(Ordering::SeqCst) >= 2,
        "a TLS connection that only asked for health outlived the auth time"
    );
}

both!(
    over_tls_only_authenticated_connections_outlive_the_auth_time,
    agent_stream_over_tls,
    plain_http_and_an_untrusted_ca_are_refused_in_the_handshake,
    mtls_requires_the_agents_client_certificate,
);
