//! The folder (ingest v2): reports are exact before it runs, replicas racing over one backlog
//! fold every batch once, and a server killed mid-fold loses nothing and folds nothing twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use sqlx::PgPool;
use tokenmeter::proto::v1 as pb;

use crate::helpers::{
    ADMIN_KEY, assert_rollups_equal_raw, authed, create_database, folded, sample, spawn_app_with,
    spawn_serve,
};
use crate::ingest::until_lock_waiters;
use crate::usage_support::{Clients, event, hour, last_two_days, ts, unique};

fn dec(text: &str) -> Decimal {
    text.parse().expect("decimal")
}

/// A USD book pricing gpt-4.1-mini at 0.40 in / 1.60 out per million (cost 0.30 / 1.20).
async fn book(api: &mut Clients) -> String {
    let book = unique("book").to_lowercase();
    api.version(
        &book,
        "USD",
        hour(72),
        &[
            ("gpt-4.1-mini", pb::TokenClass::Input, "0.40", "0.30"),
            ("gpt-4.1-mini", pb::TokenClass::Output, "1.60", "1.20"),
        ],
    )
    .await;
    book
}

/// Usage event `n` of `tenant`: on one of 12 transactions (or none), two agents, tokens that
/// depend on `n` so that sums catch a lost or doubled event.
fn usage(tenant: &str, n: usize) -> pb::UsageEvent {
    let mut e = event(
        tenant,
        &format!("e{n}"),
        i64::try_from(1_000 + n % 977).expect("tokens"),
        i64::try_from(n % 131).expect("tokens"),
    );
    e.transaction_id = (!n.is_multiple_of(13)).then(|| format!("tx{}", n % 12));
    e.agent_id = ["agent-1", "agent-2"][n % 2].to_owned();
    e
}

/// Lifecycle event `n` of `tenant`: transaction tx(n % 12) starts, completes, or is refunded,
/// so transactions change state while their usage is being folded.
fn lifecycle(tenant: &str, n: usize) -> pb::TransactionEvent {
    use pb::transaction_event::Kind;
    let usd = |amount: &str| pb::Money {
        amount: amount.to_owned(),
        currency: "USD".to_owned(),
    };
    let kind = match (n / 12) % 3 {
        0 => Kind::Started(pb::TransactionStarted {}),
        1 => Kind::Completed(pb::TransactionCompleted {
            revenue: Some(usd("12.50")),
        }),
        _ => Kind::Refunded(pb::TransactionRefunded {
            amount: Some(usd("2")),
            reason: "late".to_owned(),
        }),
    };
    pb::TransactionEvent {
        event_id: format!("l{n}"),
        source: "shop".to_owned(),
        tenant_id: tenant.to_owned(),
        transaction_id: format!("tx{}", n % 12),
        agent_id: "agent-1".to_owned(),
        service: "food-delivery".to_owned(),
        occurred_at: Some(ts(hour(1) + chrono::Duration::minutes(2))),
        kind: Some(kind),
        attributes: Default::default(),
    }
}

async fn record(api: &mut Clients, events: Vec<pb::TransactionEvent>) {
    for result in crate::transactions::record(api, events).await {
        assert!(result.reason.is_empty(), "{result:?}");
    }
}

async fn usage_response(api: &mut Clients, tenant: &str) -> pb::QueryUsageResponse {
    api.reports
        .query_usage(pb::QueryUsageRequest {
            tenant_ids: vec![tenant.to_owned()],
            time_range: Some(last_two_days()),
            ..Default::default()
        })
        .await
        .expect("query usage")
        .into_inner()
}

#[tokio::test]
async fn a_report_right_after_an_acknowledged_batch_includes_it_and_says_what_is_unfolded() {
    // No folder and no retention pass (which folds first): the batch stays queued.
    let app = spawn_app_with(|s| {
        s.fold.enabled = false;
        s.ingest.retention_interval = Duration::ZERO;
    })
    .await;
    let mut api = Clients::new(app.channel().await);
    let book = book(&mut api).await;
    let tenant = api.tenant("USD", "UTC", Some(&book)).await;
    let mut on_transaction = event(&tenant, "c", 500_000, 0);
    on_transaction.transaction_id = Some("tx-1".to_owned());
    api.ingest(vec![
        event(&tenant, "a", 1_000_000, 500_000),
        event(&tenant, "b", 2_000_000, 0),
        on_transaction,
    ])
    .await;

    let before = usage_response(&mut api, &tenant).await;
    let draft = api
        .invoices
        .preview_invoice(pb::PreviewInvoiceRequest {
            tenant_id: tenant.clone(),
            // The month of the events (UTC calendar months).
            period: hour(1).format("%Y-%m").to_string(),
            currency: String::new(),
        })
        .await
        .expect("preview")
        .into_inner()
        .invoices
        .pop()
        .expect("a draft");
    let attribution = api.attribution(&tenant, &[]).await;
    let transaction = crate::transactions::get(&mut api, &tenant, "tx-1", false).await;
    let (_, readyz) = {
        let response = reqwest::get(app.admin_url("/readyz"))
            .await
            .expect("readyz");
        let status = response.status();
        (status, response.text().await.expect("body"))
    };
    let ready: serde_json::Value = serde_json::from_str(&readyz).expect("json");
    let folded_now = tokenmeter::store::fold::fold_all(&app.pool, 1_000_000)
        .await
        .expect("fold");
    let after = usage_response(&mut api, &tenant).await;

    // (1,000,000 + 2,000,000 + 500,000) × 0.40 / 1M + 500,000 × 1.60 / 1M = 1.40 + 0.80
    let row = &before.rows[0];
    assert_eq!(row.event_count, 3);
    assert_eq!(row.tokens.expect("tokens").input, 3_500_000);
    assert_eq!(dec(&row.billed_amount), dec("2.20"));
    let freshness = before.freshness.expect("freshness");
    assert_eq!(freshness.unfolded_events, 3);
    assert!(freshness.fold_lag_ms >= 0, "{freshness:?}");
    assert_eq!(dec(&attribution[0].spend), dec("2.20"));
    // The draft of their period: 3,500,000 input and 500,000 output tokens, 2.20 in all.
    let quantities: Vec<i64> = draft.lines.iter().map(|l| l.quantity).collect();
    assert_eq!(quantities, vec![3_500_000, 500_000], "{:?}", draft.lines);
    assert_eq!(dec(&draft.subtotal), dec("2.20"));
    assert_eq!(attribution[0].usage_event_count, 3);
    // 500,000 × 0.40 / 1M
    assert_eq!(
        transaction.spend.as_ref().map(|m| dec(&m.amount)),
        Some(dec("0.20"))
    );
    assert_eq!(ready["ready"], true, "{readyz}");
    assert_eq!(ready["fold"]["queued_events"], 3, "{readyz}");
    assert_eq!(ready["fold"]["queued_batches"], 1, "{readyz}");

    // Folded: the same report, now nothing unfolded.
    assert_eq!(folded_now.batches, 1);
    assert_eq!(folded_now.events, 3);
    let freshness = after.freshness.expect("freshness");
    assert_eq!((freshness.unfolded_events, freshness.fold_lag_ms), (0, 0));
    assert_eq!(after.rows[0].event_count, 3);
    assert_eq!(dec(&after.rows[0].billed_amount), dec("2.20"));
    assert_rollups_equal_raw(&app.pool).await;
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn two_replicas_folding_one_backlog_fold_every_batch_once() {
    let database = create_database().await;
    let url = database.clone();
    let writer = spawn_app_with(move |s| {
        s.database.url = url;
        s.fold.enabled = false;
        s.ingest.retention_interval = Duration::ZERO;
    })
    .await;
    let mut api = Clients::new(writer.channel().await);
    let book = book(&mut api).await;
    let tenants = [
        api.tenant("USD", "UTC", Some(&book)).await,
        api.tenant("USD", "Europe/Berlin", Some(&book)).await,
    ];
    // 60 batches of 10 usage events, lifecycle events in between: a backlog of 60 batches.
    for b in 0..60 {
        let tenant = &tenants[b % 2];
        api.ingest((0..10).map(|i| usage(tenant, b * 10 + i)).collect())
            .await;
        if b % 5 == 4 {
            record(&mut api, (b..b + 3).map(|n| lifecycle(tenant, n)).collect()).await;
        }
    }
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM fold_queue")
        .fetch_one(&writer.pool)
        .await
        .expect("queue");
    assert_eq!(queued, 60);

    // Each replica's first fold claims its batches, then waits here: both hold a share.
    let mut blocker = writer.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE usage_state_daily_rollups IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .expect("hold the folds");
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let url = database.clone();
        replicas.push(
            spawn_app_with(move |s| {
                s.database.url = url;
                s.fold.max_events = 25;
                s.ingest.retention_interval = Duration::ZERO;
            })
            .await,
        );
    }
    until_lock_waiters(&writer.pool, 2, "both replicas' folds").await;
    blocker.rollback().await.expect("release the folds");
    folded(&writer.pool).await;

    let mut by_replica = Vec::new();
    for replica in &replicas {
        let metrics = replica.metrics().await;
        by_replica.push(sample(&metrics, "tokenmeter_fold_batches_total", &[]).unwrap_or(0.0));
    }
    assert!(by_replica.iter().all(|&n| n >= 1.0), "{by_replica:?}");
    assert_eq!(by_replica.iter().sum::<f64>(), 60.0, "{by_replica:?}");
    assert_rollups_equal_raw(&writer.pool).await;
    for replica in replicas {
        replica.stop().await.expect("clean shutdown");
    }
    writer.stop().await.expect("clean shutdown");
}

/// Waits until a backend other than `pool`'s runs a fold (or fails after 60 s).
async fn until_folding(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let folding: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                            WHERE datname = current_database() AND state = 'active'
                              AND query LIKE '%fold_usage(%' AND pid <> pg_backend_pid())",
        )
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity");
        if folding {
            return;
        }
        assert!(Instant::now() < deadline, "the server never folded");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn a_server_killed_while_it_folds_under_load_folds_every_batch_once_after_restart() {
    let url = create_database().await;
    // Folds every 250 ms of queued batches: large enough to be caught in flight.
    let env = [
        ("TOKENMETER_FOLD__INTERVAL", "20ms"),
        ("TOKENMETER_FOLD__MAX_AGE", "250ms"),
        ("TOKENMETER_INGEST__RETENTION_INTERVAL", "0s"),
    ];
    let pool = PgPool::connect(&url).await.expect("pool");
    let next = Arc::new(AtomicUsize::new(0));
    let mut tenants = Vec::new();
    let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
    for round in 0..3 {
        let mut server = spawn_serve(&url, &env).await;
        let mut api = Clients::new(server.channel().await);
        if round == 0 {
            let book = book(&mut api).await;
            for zone in ["UTC", "Asia/Tokyo", "America/New_York"] {
                tenants.push(api.tenant("USD", zone, Some(&book)).await);
            }
        }
        let endpoint = format!("http://127.0.0.1:{}", server.grpc_port);
        let mut writers = Vec::new();
        for worker in 0..3 {
            let (endpoint, next, tenants) = (endpoint.clone(), next.clone(), tenants.clone());
            writers.push(tokio::spawn(async move {
                let channel = tonic::transport::Endpoint::from_shared(endpoint)
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("connect");
                let mut client = pb::usage_service_client::UsageServiceClient::new(authed(
                    channel.clone(),
                    ADMIN_KEY,
                ));
                let mut transactions =
                    pb::transaction_service_client::TransactionServiceClient::new(authed(
                        channel, ADMIN_KEY,
                    ));
                loop {
                    let first = next.fetch_add(40, Ordering::Relaxed);
                    let tenant = &tenants[first / 40 % tenants.len()];
                    let events = (first..first + 40).map(|n| usage(tenant, n)).collect();
                    let request = pb::IngestUsageRequest {
                        events,
                        omit_accepted_results: true,
                    };
                    if client.ingest_usage(request).await.is_err() {
                        return;
                    }
                    if worker == 0 {
                        let events = (first / 40..first / 40 + 2)
                            .map(|n| lifecycle(tenant, n))
                            .collect();
                        let request = pb::RecordTransactionEventsRequest {
                            events,
                            omit_accepted_results: true,
                        };
                        if transactions
                            .record_transaction_events(request)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }));
        }
        until_folding(&pool).await;
        // Somewhere in the fold: 0–7 ms after it was seen running.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(rng % 8)).await;
        server.child().kill().expect("kill -9");
        server.child().wait().expect("reap");
        for writer in writers {
            writer.await.expect("writer");
        }
    }

    let mut restarted = spawn_serve(&url, &env).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert!(
        stored >= 3 * 40,
        "too little was ingested to test: {stored}"
    );
    assert_rollups_equal_raw(&pool).await;
    let rolled_up: i64 = sqlx::query_scalar("SELECT sum(events)::int8 FROM usage_rollups")
        .fetch_one(&pool)
        .await
        .expect("events");
    assert_eq!(rolled_up, stored);
    restarted.child().kill().expect("stop");
    restarted.child().wait().expect("reap");
    pool.close().await;
}
