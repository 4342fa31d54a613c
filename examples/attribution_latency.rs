//! The load process of `benches/attribution.sh`: calls `ReportService/GetAttribution` for one
//! tenant and range, one call at a time, in the shapes named on the command line, and prints
//! each shape's latency percentiles, rows and the figures of its first row, tab-separated.
//!
//!   attribution_latency URL TENANT START END CALLS SHAPE...
//!
//! A shape is `WINDOW:DIM,DIM…` with WINDOW `none`, `day` or `month` and dimensions among
//! `tenant`, `agent`, `service`, `provider`, `model` (none after the colon = ungrouped). The API
//! key comes from `TOKENMETER_API_KEY`. Two untimed calls per shape warm the server first.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokenmeter::grpc::auth::Bearer;
use tokenmeter::proto::v1 as pb;
use tokenmeter::proto::v1::report_service_client::ReportServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Client = ReportServiceClient<InterceptedService<Channel, Bearer>>;

fn timestamp(text: &str) -> anyhow::Result<prost_types::Timestamp> {
    let at = chrono::DateTime::parse_from_rfc3339(text).with_context(|| format!("{text:?}"))?;
    Ok(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: 0,
    })
}

fn request(
    tenant: &str,
    range: &pb::TimeRange,
    shape: &str,
) -> anyhow::Result<pb::GetAttributionRequest> {
    let (window, dims) = shape.split_once(':').unwrap_or((shape, ""));
    let window = match window {
        "none" => pb::TimeBucket::None,
        "day" => pb::TimeBucket::Day,
        "month" => pb::TimeBucket::Month,
        other => bail!("unknown window {other:?}"),
    };
    let group_by = dims
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| {
            Ok(match d {
                "tenant" => pb::AttributionDimension::Tenant,
                "agent" => pb::AttributionDimension::Agent,
                "service" => pb::AttributionDimension::Service,
                "provider" => pb::AttributionDimension::Provider,
                "model" => pb::AttributionDimension::Model,
                other => bail!("unknown dimension {other:?}"),
            } as i32)
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(pb::GetAttributionRequest {
        tenant_ids: vec![tenant.to_owned()],
        time_range: Some(*range),
        window: window as i32,
        group_by,
        page_size: 1000,
        ..Default::default()
    })
}

/// One report, every page; returns the rows.
async fn report(
    client: &mut Client,
    request: &pb::GetAttributionRequest,
) -> anyhow::Result<Vec<pb::AttributionRow>> {
    let mut rows = Vec::new();
    let mut request = request.clone();
    loop {
        let page = client
            .get_attribution(request.clone())
            .await
            .context("GetAttribution")?
            .into_inner();
        rows.extend(page.rows);
        if page.next_page_token.is_empty() {
            return Ok(rows);
        }
        request.page_token = page.next_page_token;
    }
}

fn percentile(sorted: &[Duration], p: usize) -> f64 {
    let rank = (sorted.len() * p).div_ceil(100).max(1) - 1;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, tenant, start, end, calls, shapes @ ..] = args.as_slice() else {
        bail!("usage: attribution_latency URL TENANT START END CALLS SHAPE...");
    };
    let calls: usize = calls.parse().context("CALLS")?;
    let range = pb::TimeRange {
        start: Some(timestamp(start)?),
        end: Some(timestamp(end)?),
    };
    let key = std::env::var("TOKENMETER_API_KEY").ok();
    let channel = Endpoint::from_shared(url.clone())?
        .timeout(Duration::from_secs(300))
        .connect()
        .await
        .with_context(|| format!("connect to {url}"))?;
    let mut client = ReportServiceClient::with_interceptor(channel, Bearer::new(key.as_deref())?)
        .max_decoding_message_size(256 * 1024 * 1024);
    println!("shape\tcalls\tp50_ms\tp99_ms\tmax_ms\trows\tfirst_row");
    for shape in shapes {
        let request = request(tenant, &range, shape)?;
        for _ in 0..2 {
            report(&mut client, &request).await?;
        }
        let mut took = Vec::with_capacity(calls);
        let mut rows = Vec::new();
        for _ in 0..calls.max(1) {
            let started = Instant::now();
            rows = report(&mut client, &request).await?;
            took.push(started.elapsed());
        }
        took.sort();
        let first = rows.first().map(|r| {
            format!(
                "completed={} failed={} refunded={} net_revenue={} tokens={} spend={} failed_spend={} refunded_spend={} unattributed_spend={}",
                r.transactions_completed,
                r.transactions_failed,
                r.transactions_refunded,
                r.net_revenue,
                r.total_tokens,
                r.spend,
                r.failed_spend,
                r.refunded_spend,
                r.unattributed_spend
            )
        });
        println!(
            "{shape}\t{}\t{:.1}\t{:.1}\t{:.1}\t{}\t{}",
            took.len(),
            percentile(&took, 50),
            percentile(&took, 99),
            percentile(&took, 100),
            rows.len(),
            first.unwrap_or_default()
        );
    }
    Ok(())
}
