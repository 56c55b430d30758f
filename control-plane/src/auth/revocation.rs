//! Ends a call's response when the token that opened it stops working, so that revoking a
//! token also ends the streams it already opened (agent sessions, watchers), not only its
//! next calls.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http_body::Frame;
use tonic::{
    body::Body,
    codegen::{http, Bytes},
};

use super::Tokens;

/// How often an open response looks whether any credential changed (an atomic load; the token
/// is looked up again only when one did).
const CHECK: Duration = Duration::from_millis(250);

/// Resolves once `token` no longer authenticates. `generation` is the credentials generation
/// read before the token was checked, so a revocation between that check and this watch is
/// seen too. A lookup that fails (database away) keeps the response open: the store's own
/// outage handling ends what must end.
async fn revoked(tokens: Arc<Tokens>, token: String, mut generation: u64) {
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = tokens.store.credentials_generation();
        if now == generation {
            continue;
        }
        generation = now;
        if let Ok(None) = tokens.principal(&token).await {
            return;
        }
    }
}

/// A response body that ends with `grpc-status: UNAUTHENTICATED` once its token is revoked.
struct Revocable {
    inner: Body,
    revoked: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl http_body::Body for Revocable {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(r) = self.revoked.as_mut() {
            if r.as_mut().poll(cx).is_ready() {
                self.revoked = None;
                let status = tonic::Status::unauthenticated("the token was revoked");
                let mut trailers = http::HeaderMap::new();
                if status.add_header(&mut trailers).is_err() {
                    return Poll::Ready(Some(Err(status)));
                }
                // Ends here: the inner body is never polled again.
                self.inner = Body::empty();
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &frame {
            self.revoked = None;
        }
        if let Poll::Ready(Some(Ok(f))) = &frame {
            if f.is_trailers() {
                self.revoked = None;
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.revoked.is_none() && self.inner.is_end_stream()
    }
}

/// `response` (to a call authenticated by `token` while the credentials generation was
/// `generation`), ended with UNAUTHENTICATED as soon as the token is revoked.
pub fn end_when_revoked(
    response: http::Response<Body>,
    tokens: Arc<Tokens>,
    token: String,
    generation: u64,
) -> http::Response<Body> {
    let (parts, inner) = response.into_parts();
    if http_body::Body::is_end_stream(&inner) {
        return http::Response::from_parts(parts, inner);
    }
    let body = Revocable {
        inner,
        revoked: Some(Box::pin(revoked(tokens, token, generation))),
    };
    http::Response::from_parts(parts, Body::new(body))
}
