//! The control plane over real sockets, driven by the agent's own client code.

use std::time::Duration;

use airlock_agent::decider::Decider;
use airlock_control_plane::ControlPlane;
use airlock_proto::v1::{
    approval_service_client::ApprovalServiceClient, ActionRequest, DecideRequest, ExecAction,
    GetRequestRequest, Hello, ListRequestsRequest, ProcessContext, RequestState, Verdict,
    WatchRequestsRequest,
};
use tonic::Code;

async fn start() -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let store = airlock_control_plane::store::Store::in_memory().unwrap();
    tokio::spawn(async move {
        ControlPlane::new(store)
            .serve(listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (url, tx)
}

fn agent(url: &str, host: &str) -> Decider {
    Decider::spawn(
        url.to_owned(),
        Hello {
            host_id: host.into(),
            hostname: host.into(),
            labels: Default::default(),
            version: "test".into(),
        },
    )
}

fn request(id: &str, user: &str) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        rule: "kubectl".into(),
        process: Some(ProcessContext {
            user: user.into(),
            ..Default::default()
        }),
        action: Some(airlock_proto::v1::action_request::Action::Exec(
            ExecAction {
                path: "/usr/bin/kubectl".into(),
                argv: vec![
                    "kubectl".into(),
                    "delete".into(),
                    "ns".into(),
                    "prod".into(),
                ],
                ..Default::default()
            },
        )),
        deadline_unix_ms: i64::MAX,
        ..Default::default()
    }
}

async fn approvals(url: &str) -> ApprovalServiceClient<tonic::transport::Channel> {
    ApprovalServiceClient::connect(url.to_owned())
        .await
        .unwrap()
}

async fn wait_pending(c: &mut ApprovalServiceClient<tonic::transport::Channel>, n: usize) {
    for _ in 0..100 {
        let list = c
            .list(ListRequestsRequest {
                state: RequestState::Pending as i32,
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        if list.requests.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("requests never arrived");
}

fn vote(id: &str, verdict: Verdict, approver: &str, reason: &str) -> DecideRequest {
    DecideRequest {
        request_id: id.into(),
        verdict: verdict as i32,
        reason: reason.into(),
        approver: approver.into(),
    }
}

#[tokio::test]
async fn decision_reaches_the_right_agent_and_request() {
    let (url, _stop) = start().await;
    let (a, b) = (agent(&url, "host-a"), agent(&url, "host-b"));
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    assert!(b.wait_connected(Duration::from_secs(5)).await);
    let mut ra = a.ask(request("a-1", "ci"));
    let mut rb = b.ask(request("b-1", "ci"));
    let mut c = approvals(&url).await;
    wait_pending(&mut c, 2).await;

    c.decide(vote("b-1", Verdict::Deny, "alice", "not during the freeze"))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), &mut rb)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (d.request_id.as_str(), d.verdict),
        ("b-1", Verdict::Deny as i32)
    );
    assert_eq!(d.decided_by, "alice");
    assert!(ra.try_recv().is_err(), "agent a must not get b's decision");

    c.decide(vote("a-1", Verdict::Allow, "alice", ""))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), ra)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (d.request_id.as_str(), d.verdict),
        ("a-1", Verdict::Allow as i32)
    );
}

#[tokio::test]
async fn refusals_are_precise_and_lose_nothing() {
    let (url, _stop) = start().await;
    let a = agent(&url, "host-a");
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let _pending = a.ask(request("r-1", "claude"));
    let mut c = approvals(&url).await;
    wait_pending(&mut c, 1).await;

    let own = c
        .decide(vote("r-1", Verdict::Allow, "claude", ""))
        .await
        .unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied);
    assert!(
        own.message().contains("made this request"),
        "{}",
        own.message()
    );
    let no_reason = c
        .decide(vote("r-1", Verdict::Deny, "alice", ""))
        .await
        .unwrap_err();
    assert_eq!(no_reason.code(), Code::InvalidArgument);
    let nobody = c
        .decide(vote("r-1", Verdict::Allow, " ", ""))
        .await
        .unwrap_err();
    assert_eq!(nobody.code(), Code::InvalidArgument);
    let unknown = c
        .decide(vote("nope", Verdict::Allow, "alice", ""))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let still = c
        .get(GetRequestRequest {
            request_id: "r-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        still.state(),
        RequestState::Pending,
        "refused votes change nothing"
    );

    c.decide(vote("r-1", Verdict::Allow, "alice", "ok"))
        .await
        .unwrap();
    let twice = c
        .decide(vote("r-1", Verdict::Deny, "bob", "late"))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn resent_request_is_one_request_and_watchers_see_it() {
    let (url, _stop) = start().await;
    let mut c = approvals(&url).await;
    let mut watch = c
        .watch(WatchRequestsRequest {
            include_pending: true,
        })
        .await
        .unwrap()
        .into_inner();
    let a = agent(&url, "host-a");
    assert!(a.wait_connected(Duration::from_secs(5)).await);
    let _first = a.ask(request("same", "ci"));
    let second = a.ask(request("same", "ci"));
    let seen = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.request.unwrap().request_id, "same");
    wait_pending(&mut c, 1).await;
    let all = c
        .list(ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.requests.len(), 1, "one request, not two");
    c.decide(vote("same", Verdict::Allow, "alice", ""))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow as i32);
}
