//! A tower layer that counts gRPC requests by method and status code and times them.
//!
//! The status of a gRPC call is known only when its response ends: in the headers for a
//! "trailers-only" error, otherwise in the trailers after the last message. So the layer wraps
//! the response body and records when the body yields its trailers or is dropped.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::telemetry::Metrics;

/// Label used for paths that are not a known method, so a client cannot grow the label set.
const UNKNOWN_METHOD: &str = "unknown";

#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Metrics,
    known_methods: Arc<HashSet<String>>,
}

impl GrpcMetricsLayer {
    /// `known_methods` are full paths such as `/grpc.health.v1.Health/Check`.
    pub fn new(metrics: Metrics, known_methods: HashSet<String>) -> Self {
        Self {
            metrics,
            known_methods: Arc::new(known_methods),
        }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Body,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let method = if self.layer.known_methods.contains(path) {
            path.to_owned()
        } else {
            UNKNOWN_METHOD.to_owned()
        };
        MeteredFuture {
            inner: self.inner.call(request),
            recorder: Some(Recorder {
                metrics: self.layer.metrics.clone(),
                method,
                started: Instant::now(),
                code: None,
            }),
        }
    }
}

pin_project! {
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        recorder: Option<Recorder>,
    }
}

impl<F, ResBody, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<MeteredBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut recorder = this.recorder.take();
        Poll::Ready(result.map(|response| {
            if let Some(recorder) = recorder.as_mut() {
                recorder.code = grpc_status_label(response.headers());
            }
            response.map(|inner| MeteredBody { inner, recorder })
        }))
    }
}

pin_project! {
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(recorder) = this.recorder.as_mut()
        {
            recorder.code = grpc_status_label(trailers);
        }
        if polled.is_none() {
            // End of stream: record now rather than waiting for the body to be dropped.
            this.recorder.take();
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Records one request when dropped, so a call cut short by the client is still counted.
struct Recorder {
    metrics: Metrics,
    method: String,
    started: Instant,
    code: Option<&'static str>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let code = self.code.unwrap_or("CANCELLED");
        self.metrics
            .grpc_requests
            .with_label_values(&[self.method.as_str(), code])
            .inc();
        self.metrics
            .grpc_request_duration
            .with_label_values(&[self.method.as_str()])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

fn grpc_status_label(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    let code = tonic::Code::from_i32(value.parse().ok()?);
    Some(code_label(code))
}

/// The canonical upper-case name of a gRPC status code, as other gRPC dashboards use.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
