//! Service transactions over gRPC: exactly-once lifecycle events, state and revenue derived
//! from them in any arrival order, and the token spend linked through usage events.

use chrono::Duration;
use rust_decimal::{Decimal, dec};
use tokenmeter::proto::v1 as pb;
use tonic::Code;

use crate::helpers::spawn_app;
use crate::usage_support::{Clients, event, hour, statuses, ts, unique};

pub fn lifecycle_of(
    tenant: &str,
    transaction: &str,
    event_id: &str,
    minutes: i64,
    kind: pb::transaction_event::Kind,
) -> pb::TransactionEvent {
    pb::TransactionEvent {
        event_id: event_id.to_owned(),
        source: "shop".to_owned(),
        tenant_id: tenant.to_owned(),
        transaction_id: transaction.to_owned(),
        agent_id: "agent-1".to_owned(),
        service: "food-delivery".to_owned(),
        occurred_at: Some(ts(hour(1) + Duration::minutes(minutes))),
        kind: Some(kind),
        attributes: Default::default(),
    }
}

pub fn started(tenant: &str, transaction: &str, event_id: &str) -> pb::TransactionEvent {
    lifecycle_of(
        tenant,
        transaction,
        event_id,
        5,
        pb::transaction_event::Kind::Started(pb::TransactionStarted {}),
    )
}

fn usd(amount: &str) -> Option<pb::Money> {
    Some(pb::Money {
        amount: amount.to_owned(),
        currency: "USD".to_owned(),
    })
}

fn completed(tenant: &str, transaction: &str, id: &str, revenue: &str) -> pb::TransactionEvent {
    completed_in(tenant, transaction, id, revenue, "USD")
}

pub fn completed_in(
    tenant: &str,
    transaction: &str,
    id: &str,
    revenue: &str,
    currency: &str,
) -> pb::TransactionEvent {
    lifecycle_of(
        tenant,
        transaction,
        id,
        20,
        pb::transaction_event::Kind::Completed(pb::TransactionCompleted {
            revenue: Some(pb::Money {
                amount: revenue.to_owned(),
                currency: currency.to_owned(),
            }),
        }),
    )
}

fn refunded(tenant: &str, transaction: &str, id: &str, amount: &str) -> pb::TransactionEvent {
    lifecycle_of(
        tenant,
        transaction,
        id,
        40,
        pb::transaction_event::Kind::Refunded(pb::TransactionRefunded {
            amount: usd(amount),
            reason: "late delivery".to_owned(),
        }),
    )
}

/// A money field as an exact decimal and its currency.
fn exact(money: &Option<pb::Money>) -> (Decimal, String) {
    let money = money.as_ref().expect("money");
    (
        money.amount.parse().expect("decimal string"),
        money.currency.clone(),
    )
}

pub async fn record(api: &mut Clients, events: Vec<pb::TransactionEvent>) -> Vec<pb::EventResult> {
    api.transactions
        .record_transaction_events(pb::RecordTransactionEventsRequest {
            events,
            omit_accepted_results: false,
        })
        .await
        .expect("record")
        .into_inner()
        .results
}

/// GetTransaction of one transaction, with its events or without.
pub async fn get(
    api: &mut Clients,
    tenant: &str,
    transaction: &str,
    include_events: bool,
) -> pb::Transaction {
    api.transactions
        .get_transaction(pb::GetTransactionRequest {
            tenant_id: tenant.to_owned(),
            transaction_id: transaction.to_owned(),
            include_events,
        })
        .await
        .expect("get")
        .into_inner()
        .transaction
        .expect("transaction")
}

fn usage_on(tenant: &str, id: &str, transaction: &str, input: i64, output: i64) -> pb::UsageEvent {
    pb::UsageEvent {
        transaction_id: Some(transaction.to_owned()),
        ..event(tenant, id, input, output)
    }
}

#[tokio::test]
async fn lifecycle_events_count_once_and_the_transaction_nets_revenue_against_its_spend() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let book = unique("book");
    api.version(
        &book,
        "USD",
        hour(48),
        &[
            ("gpt-4.1-mini", pb::TokenClass::Input, "2.00", "1.50"),
            ("gpt-4.1-mini", pb::TokenClass::Output, "8.00", "6.00"),
        ],
    )
    .await;
    let tenant = api.tenant("USD", "UTC", Some(&book)).await;
    let order = unique("order");

    // Usage arrives before the transaction exists: it is already linked.
    api.ingest(vec![usage_on(&tenant, "u1", &order, 100_000, 20_000)])
        .await;
    let early = get(&mut api, &tenant, &order, true).await;
    assert_eq!(early.state(), pb::TransactionState::NotStarted);

    // The completion arrives before the start, then a refund, a retry and a conflict.
    let results = record(
        &mut api,
        vec![
            completed(&tenant, &order, "t-complete", "25.00"),
            started(&tenant, &order, "t-start"),
            refunded(&tenant, &order, "t-refund", "5.50"),
            refunded(&tenant, &order, "t-refund", "5.50"),
            completed(&tenant, &order, "t-complete", "99.00"),
            lifecycle_of(
                &tenant,
                &order,
                "t-bad",
                50,
                pb::transaction_event::Kind::Refunded(pb::TransactionRefunded {
                    amount: usd("-1"),
                    reason: String::new(),
                }),
            ),
        ],
    )
    .await;
    let got: Vec<pb::IngestStatus> = results.iter().map(|r| r.status()).collect();
    assert_eq!(
        got,
        vec![
            pb::IngestStatus::Accepted,
            pb::IngestStatus::Accepted,
            pb::IngestStatus::Accepted,
            pb::IngestStatus::Duplicate,
            pb::IngestStatus::Conflict,
            pb::IngestStatus::Invalid,
        ]
    );
    assert_eq!(results[4].field, "completed.revenue.amount");
    assert_eq!(results[5].field, "refunded.amount.amount");
    // Resending the whole batch changes nothing.
    let again = record(&mut api, vec![started(&tenant, &order, "t-start")]).await;
    assert_eq!(again[0].status(), pb::IngestStatus::Duplicate);

    // Usage after completion is attributed too.
    let usage = api
        .ingest(vec![usage_on(&tenant, "u2", &order, 50_000, 10_000)])
        .await;
    assert_eq!(statuses(&usage), vec![pb::IngestStatus::Accepted]);

    let read = get(&mut api, &tenant, &order, true).await;
    assert_eq!(read.state(), pb::TransactionState::Refunded);
    assert_eq!(read.agent_id, "agent-1");
    assert_eq!(read.service, "food-delivery");
    assert_eq!(exact(&read.revenue), (dec!(25.00), "USD".to_owned()));
    assert_eq!(exact(&read.refunded), (dec!(5.50), "USD".to_owned()));
    // 25.00 − 5.50
    assert_eq!(exact(&read.net_revenue), (dec!(19.50), "USD".to_owned()));
    // input 100,000 + 50,000 = 150,000; output 20,000 + 10,000 = 30,000
    let tokens = read.tokens.expect("tokens");
    assert_eq!((tokens.input, tokens.output), (150_000, 30_000));
    assert_eq!(read.total_tokens, 180_000);
    assert_eq!(read.usage_event_count, 2);
    // spend: 150,000 × 2.00/1M + 30,000 × 8.00/1M = 0.30 + 0.24 = 0.54
    // cost:  150,000 × 1.50/1M + 30,000 × 6.00/1M = 0.225 + 0.18 = 0.405
    assert_eq!(exact(&read.spend), (dec!(0.54), "USD".to_owned()));
    assert_eq!(exact(&read.cost), (dec!(0.405), "USD".to_owned()));
    assert_eq!(read.events.len(), 3, "started, completed, refunded");
    assert!(read.anomalies.is_empty(), "{:?}", read.anomalies);
    let conflicts: Vec<String> = sqlx::query_scalar(
        "SELECT first_differing_field FROM transaction_event_conflicts WHERE tenant_id = $1",
    )
    .bind(&tenant)
    .fetch_all(&app.pool)
    .await
    .expect("conflicts");
    assert_eq!(conflicts, vec!["completed.revenue.amount"]);
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn transactions_list_newest_first_filtered_by_state_including_usage_only_ones() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let tenant = api.tenant("USD", "UTC", None).await;
    let failed = lifecycle_of(
        &tenant,
        "order-failed",
        "f1",
        30,
        pb::transaction_event::Kind::Failed(pb::TransactionFailed {
            reason: "no courier".to_owned(),
        }),
    );
    record(
        &mut api,
        vec![
            started(&tenant, "order-done", "s1"),
            completed(&tenant, "order-done", "c1", "10"),
            failed,
        ],
    )
    .await;
    api.ingest(vec![usage_on(
        &tenant,
        "u-orphan",
        "order-usage-only",
        5,
        5,
    )])
    .await;

    let list = |states: Vec<pb::TransactionState>| pb::ListTransactionsRequest {
        tenant_id: tenant.clone(),
        states: states.into_iter().map(|s| s as i32).collect(),
        ..Default::default()
    };
    let all = api
        .transactions
        .list_transactions(list(vec![]))
        .await
        .expect("list")
        .into_inner()
        .transactions;
    let ids: Vec<&str> = all.iter().map(|t| t.transaction_id.as_str()).collect();
    // first seen: order-failed at +30 min, order-done at +5, order-usage-only at the hour.
    assert_eq!(ids, vec!["order-failed", "order-done", "order-usage-only"]);
    assert_eq!(all[2].state(), pb::TransactionState::NotStarted);
    // A page is read in two queries for all its transactions; each entry is still exactly
    // what GetTransaction answers for it (usage, revenue and state of its own).
    for listed in &all {
        let got = get(&mut api, &tenant, &listed.transaction_id, false).await;
        assert_eq!(&got, listed);
    }
    let failed_only = api
        .transactions
        .list_transactions(list(vec![pb::TransactionState::Failed]))
        .await
        .expect("list")
        .into_inner()
        .transactions;
    assert_eq!(failed_only.len(), 1);
    assert_eq!(failed_only[0].transaction_id, "order-failed");
    assert!(failed_only[0].events.is_empty(), "lists carry no events");

    let missing = api
        .transactions
        .get_transaction(pb::GetTransactionRequest {
            tenant_id: tenant.clone(),
            transaction_id: "never-seen".to_owned(),
            include_events: false,
        })
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound);
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn the_sql_state_rule_agrees_with_the_domain_fold_for_every_set_of_kinds() {
    use tokenmeter::domain::transaction::State;
    let app = spawn_app().await;
    for mask in 0u8..32 {
        let kinds: Vec<i16> = (1..=5).filter(|k| mask & (1 << (k - 1)) != 0).collect();
        let sql: i16 = sqlx::query_scalar("SELECT transaction_state($1::int2[])")
            .bind(&kinds)
            .fetch_one(&app.pool)
            .await
            .expect("state");
        assert_eq!(sql, State::from_kinds(&kinds) as i16, "kinds {kinds:?}");
    }
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_calendar_change_racing_a_tenants_first_lifecycle_batch_waits_for_it_and_is_refused() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let tenant = api.tenant("USD", "UTC", None).await;
    // The batch is held at its first write, after it took its tenant's row.
    let stall = crate::ingest::stall_writes(&app.pool, "transaction_events").await;
    let mut other = Clients::new(app.channel().await);
    let batch = {
        let tenant = tenant.clone();
        tokio::spawn(async move { record(&mut other, vec![started(&tenant, "o1", "e1")]).await })
    };
    crate::ingest::until_lock_waiters(&app.pool, 1, "the batch").await;
    let mut admin = api.admin.clone();
    let update = {
        let request = pb::UpdateTenantRequest {
            tenant: Some(pb::Tenant {
                tenant_id: tenant.clone(),
                billing_timezone: "Europe/Berlin".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["billing_timezone".into()],
            }),
        };
        tokio::spawn(async move { admin.update_tenant(request).await })
    };
    crate::ingest::until_lock_waiters(&app.pool, 2, "UpdateTenant").await;
    stall.commit().await.expect("release the writes");

    let results = batch.await.expect("batch");
    assert_eq!(results[0].status(), pb::IngestStatus::Accepted);
    let refused = update
        .await
        .expect("update task")
        .expect_err("the lifecycle event exists by the time the update reads history");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().starts_with("tenant.billing_timezone:"),
        "{}",
        refused.message()
    );
    app.stop().await.expect("clean shutdown");
}
