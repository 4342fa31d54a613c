//! Quotas against the real Postgres (and Kafka for alerts): the hard limit under concurrency
//! across two server processes, TTL expiry, settlement, soft limits, alerts, money limits,
//! local-midnight windows, policy validation, and budget leases (a replica killed holding a
//! slice, grants settled or released before they are written, a limit lowered while slices are
//! out, a graceful stop).

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use prost::Message as _;
use rdkafka::Message as _;
use tokenmeter::proto::v1 as pb;
use tokenmeter::proto::v1::quota_service_client::QuotaServiceClient;
use tonic::Code;

use crate::helpers::{
    ADMIN_KEY, Authed, TestApp, authed, create_database, create_topic, spawn_app, spawn_app_with,
    spawn_serve, tokenmeter_command,
};
use crate::kafka_ingest::{consume, produce, producer, read_all};
use crate::usage_support::{Clients, event, hour, ts, unique};

pub fn quota_client(channel: tonic::transport::Channel) -> QuotaServiceClient<Authed> {
    QuotaServiceClient::new(authed(channel, ADMIN_KEY))
}

/// A tenant-wide daily token policy.
pub fn token_policy(
    tenant: &str,
    limit: i64,
    enforcement: pb::QuotaEnforcement,
    thresholds: &[i32],
) -> pb::QuotaPolicy {
    pb::QuotaPolicy {
        subject: Some(pb::QuotaSubject {
            tenant_id: tenant.to_owned(),
            scope: None,
        }),
        name: "daily tokens".into(),
        window: pb::QuotaWindow::Day as i32,
        limit: Some(pb::QuotaLimit {
            kind: Some(pb::quota_limit::Kind::Tokens(pb::TokenLimit {
                limit,
                token_classes: vec![],
            })),
        }),
        enforcement: enforcement as i32,
        alert_thresholds_bps: thresholds.to_vec(),
        ..Default::default()
    }
}

pub async fn create(quota: &mut QuotaServiceClient<Authed>, policy: pb::QuotaPolicy) -> String {
    quota
        .create_quota_policy(pb::CreateQuotaPolicyRequest {
            policy: Some(policy),
        })
        .await
        .expect("create policy")
        .into_inner()
        .policy
        .expect("policy")
        .policy_id
}

pub fn reserve_request(tenant: &str, input: i64) -> pb::ReserveRequest {
    pb::ReserveRequest {
        tenant_id: tenant.to_owned(),
        agent_id: "agent-1".into(),
        provider: "openai".into(),
        model: "gpt-4.1-mini".into(),
        estimate: Some(pb::reserve_request::Estimate::Tokens(pb::TokenCounts {
            input,
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub async fn reserve(
    quota: &mut QuotaServiceClient<Authed>,
    request: pb::ReserveRequest,
) -> pb::ReserveResponse {
    quota
        .reserve(request)
        .await
        .expect("reserve call")
        .into_inner()
}

async fn status(quota: &mut QuotaServiceClient<Authed>, tenant: &str) -> Vec<pb::PolicyStatus> {
    quota
        .get_quota_status(pb::GetQuotaStatusRequest {
            tenant_id: tenant.to_owned(),
            agent_id: "agent-1".into(),
            ..Default::default()
        })
        .await
        .expect("status")
        .into_inner()
        .policies
}

fn tokens(quantity: Option<&pb::QuotaQuantity>) -> i64 {
    match quantity.and_then(|q| q.value.as_ref()) {
        Some(pb::quota_quantity::Value::Tokens(n)) => *n,
        other => panic!("not a token quantity: {other:?}"),
    }
}

fn money(quantity: Option<&pb::QuotaQuantity>) -> rust_decimal::Decimal {
    match quantity.and_then(|q| q.value.as_ref()) {
        Some(pb::quota_quantity::Value::Money(m)) => m.amount.parse().expect("decimal"),
        other => panic!("not a money quantity: {other:?}"),
    }
}

/// (used, reserved) of the only policy.
async fn used_reserved(quota: &mut QuotaServiceClient<Authed>, tenant: &str) -> (i64, i64) {
    let policies = status(quota, tenant).await;
    assert_eq!(policies.len(), 1, "{policies:?}");
    (
        tokens(policies[0].used.as_ref()),
        tokens(policies[0].reserved.as_ref()),
    )
}

/// An event of `input` tokens, now, for `agent-1`.
fn usage_now(tenant: &str, input: i64) -> pb::UsageEvent {
    let mut e = event(tenant, &unique("e"), input, 0);
    e.occurred_at = Some(ts(Utc::now()));
    e
}

/// Clients of `app`, a new USD tenant in UTC, and its tenant-wide daily token policy.
async fn with_policy(
    app: &TestApp,
    limit: i64,
    enforcement: pb::QuotaEnforcement,
    thresholds: &[i32],
) -> (Clients, QuotaServiceClient<Authed>, String, String) {
    let mut api = Clients::new(app.channel().await);
    let mut quota = quota_client(app.channel().await);
    let tenant = api.tenant("USD", "UTC", None).await;
    let policy_id = create(
        &mut quota,
        token_policy(&tenant, limit, enforcement, thresholds),
    )
    .await;
    (api, quota, tenant, policy_id)
}

#[tokio::test]
async fn reservations_racing_across_two_servers_never_exceed_a_hard_budget_and_use_it_all() {
    const LIMIT: i64 = 5_000;
    const CLIENTS: usize = 64;
    let url = create_database().await;
    let first = spawn_serve(&url, &[]).await;
    let second = spawn_serve(&url, &[]).await;
    let endpoints = [first.grpc_port, second.grpc_port].map(|p| format!("http://127.0.0.1:{p}"));
    let channel = |i: usize| {
        tonic::transport::Endpoint::from_shared(endpoints[i % 2].clone())
            .expect("endpoint")
            .connect_lazy()
    };
    let mut admin = Clients::new(channel(0));
    let tenant = admin.tenant("USD", "UTC", None).await;
    let mut quota = quota_client(channel(0));
    create(
        &mut quota,
        token_policy(&tenant, LIMIT, pb::QuotaEnforcement::Hard, &[]),
    )
    .await;

    // Each client asks for its own size until denied, then for half of it, down to 1 token:
    // the budget ends exhausted only if no denial was spurious.
    let mut racers = Vec::new();
    for i in 0..CLIENTS {
        let (mut quota, tenant) = (quota_client(channel(i)), tenant.clone());
        racers.push(tokio::spawn(async move {
            let (mut size, mut granted) = (1 + (i as i64 * 7) % 50, 0);
            while size > 0 {
                let answer = reserve(&mut quota, reserve_request(&tenant, size)).await;
                match answer.decision() {
                    pb::QuotaDecision::Allow => granted += size,
                    pb::QuotaDecision::Deny => size /= 2,
                    other => panic!("unexpected decision {other:?}"),
                }
            }
            granted
        }));
    }
    let mut granted = 0;
    for racer in racers {
        granted += racer.await.expect("racer");
    }
    // Each server writes what it granted within milliseconds; a status read waits only for its
    // own server's grants.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while used_reserved(&mut quota, &tenant).await.1 < granted
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (used, reserved) = used_reserved(&mut quota, &tenant).await;
    assert!(granted <= LIMIT, "granted {granted} of {LIMIT}");
    assert!(
        granted * 100 >= LIMIT * 99,
        "only {granted} of {LIMIT} used"
    );
    assert_eq!((used, reserved), (0, granted));
}

#[tokio::test]
async fn two_replicas_racing_for_a_budget_of_one_grant_get_it_once_in_every_round() {
    const ROUNDS: usize = 6;
    const LIMIT: i64 = 10;
    let first = spawn_app().await;
    let url = first
        .pool
        .connect_options()
        .get_database()
        .map(str::to_owned)
        .expect("database name");
    let second = spawn_app_with(|s| {
        let mut other = url::Url::parse(&s.database.url).expect("url");
        other.set_path(&url);
        s.database.url = other.to_string();
    })
    .await;
    let mut admin = Clients::new(first.channel().await);
    let mut quotas = [
        quota_client(first.channel().await),
        quota_client(second.channel().await),
    ];

    for round in 0..ROUNDS {
        let tenant = admin.tenant("USD", "UTC", None).await;
        let policy_id = create(
            &mut quotas[0],
            token_policy(&tenant, LIMIT, pb::QuotaEnforcement::Hard, &[]),
        )
        .await;
        // The barrier: the test holds the policy's counter row (its UTC day), so both
        // replicas' lease transactions queue behind it and then contend for the same budget.
        sqlx::query(
            "INSERT INTO quota_counters (tenant_id, policy_id, window_start, window_end)
             VALUES ($1, $2, date_trunc('day', now(), 'UTC'),
                     date_trunc('day', now(), 'UTC') + interval '1 day')",
        )
        .bind(&tenant)
        .bind(&policy_id)
        .execute(&first.pool)
        .await
        .expect("counter");
        let mut barrier = first.pool.begin().await.expect("begin");
        sqlx::query("SELECT 1 FROM quota_counters WHERE tenant_id = $1 FOR UPDATE")
            .bind(&tenant)
            .execute(&mut *barrier)
            .await
            .expect("hold the counter");
        let racers: Vec<_> = quotas
            .iter()
            .map(|quota| {
                let (mut quota, tenant) = (quota.clone(), tenant.clone());
                tokio::spawn(
                    async move { reserve(&mut quota, reserve_request(&tenant, LIMIT)).await },
                )
            })
            .collect();
        crate::ingest::until_lock_waiters(&first.pool, 2, "both replicas' lease transactions")
            .await;
        barrier.commit().await.expect("release");
        let mut decisions = Vec::new();
        for racer in racers {
            decisions.push(racer.await.expect("racer").decision());
        }
        decisions.sort_by_key(|d| *d as i32);

        assert_eq!(
            decisions,
            vec![pb::QuotaDecision::Allow, pb::QuotaDecision::Deny],
            "round {round}: one grant of {LIMIT} fits a budget of {LIMIT}"
        );
    }
    second.stop().await.expect("clean shutdown");
    first.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_reservation_never_settled_is_released_at_its_ttl() {
    let app = spawn_app_with(|s| s.quota.expiry_interval = Duration::from_millis(100)).await;
    let (_, mut quota, tenant, _) = with_policy(&app, 1000, pb::QuotaEnforcement::Hard, &[]).await;
    let mut request = reserve_request(&tenant, 600);
    request.ttl = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });

    let held = reserve(&mut quota, request).await;
    let during = used_reserved(&mut quota, &tenant).await;
    let denied_meanwhile = reserve(&mut quota, reserve_request(&tenant, 600)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while used_reserved(&mut quota, &tenant).await.1 != 0 {
        assert!(std::time::Instant::now() < deadline, "hold never released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let released = quota
        .release(pb::ReleaseRequest {
            tenant_id: tenant.clone(),
            reservation_id: held.reservation_id.clone(),
        })
        .await
        .expect("release")
        .into_inner();
    let after = reserve(&mut quota, reserve_request(&tenant, 600)).await;

    assert_eq!(held.decision(), pb::QuotaDecision::Allow);
    assert_eq!(during, (0, 600));
    assert_eq!(denied_meanwhile.decision(), pb::QuotaDecision::Deny);
    assert_eq!(released.state(), pb::ReservationState::Expired);
    assert_eq!(after.decision(), pb::QuotaDecision::Allow);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_settled_reservation_moves_from_reserved_to_used_and_an_event_replaces_a_counts_settlement()
 {
    let app = spawn_app().await;
    let (mut api, mut quota, tenant, _) =
        with_policy(&app, 10_000, pb::QuotaEnforcement::Hard, &[]).await;

    // Settled by the usage event sent with Settle.
    let a = reserve(&mut quota, reserve_request(&tenant, 1000)).await;
    let held = used_reserved(&mut quota, &tenant).await;
    let settled = quota
        .settle(pb::SettleRequest {
            tenant_id: tenant.clone(),
            reservation_id: a.reservation_id.clone(),
            actual: Some(pb::settle_request::Actual::UsageEvent(usage_now(
                &tenant, 300,
            ))),
        })
        .await
        .expect("settle")
        .into_inner();
    let after_a = used_reserved(&mut quota, &tenant).await;

    // Settled by plain ingest carrying the reservation id.
    let b = reserve(&mut quota, reserve_request(&tenant, 500)).await;
    let mut carrying = usage_now(&tenant, 200);
    carrying.reservation_id = Some(b.reservation_id.clone());
    api.ingest(vec![carrying]).await;
    let after_b = used_reserved(&mut quota, &tenant).await;

    // Settled with counts first; the usage event arriving later replaces them.
    let c = reserve(&mut quota, reserve_request(&tenant, 400)).await;
    let counts = |input| pb::SettleRequest {
        tenant_id: tenant.clone(),
        reservation_id: c.reservation_id.clone(),
        actual: Some(pb::settle_request::Actual::ActualTokens(pb::TokenCounts {
            input,
            ..Default::default()
        })),
    };
    quota.settle(counts(100)).await.expect("settle counts");
    let after_counts = used_reserved(&mut quota, &tenant).await;
    let again = quota.settle(counts(100)).await.expect("same counts again");
    let other = quota.settle(counts(101)).await.expect_err("other counts");
    let mut late = usage_now(&tenant, 150);
    late.reservation_id = Some(c.reservation_id.clone());
    api.ingest(vec![late]).await;
    let after_c = used_reserved(&mut quota, &tenant).await;

    assert_eq!(held, (0, 1000));
    assert_eq!(settled.state(), pb::ReservationState::Settled);
    assert_eq!(
        settled.usage_result.expect("usage result").status(),
        pb::IngestStatus::Accepted
    );
    assert_eq!(settled.settled_tokens.expect("settled").input, 300);
    assert_eq!(after_a, (300, 0));
    assert_eq!(after_b, (500, 0));
    assert_eq!(after_counts, (600, 0));
    assert_eq!(again.into_inner().state(), pb::ReservationState::Settled);
    assert_eq!(other.code(), Code::FailedPrecondition);
    assert_eq!(after_c, (650, 0));
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_usage_event_consumed_from_kafka_settles_its_reservation() {
    let (topic, dlq, group) = (
        create_topic(1).await,
        create_topic(1).await,
        unique("group"),
    );
    let app = spawn_app_with(|s| consume(s, &topic, &dlq, &group)).await;
    let (_, mut quota, tenant, _) = with_policy(&app, 1000, pb::QuotaEnforcement::Hard, &[]).await;
    let held = reserve(&mut quota, reserve_request(&tenant, 500)).await;
    let mut usage = usage_now(&tenant, 200);
    usage.reservation_id = Some(held.reservation_id.clone());

    produce(
        &producer(),
        &topic,
        &tenant,
        &usage.encode_to_vec(),
        &[("content-type", "application/x-protobuf")],
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while used_reserved(&mut quota, &tenant).await != (200, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "not settled: {:?}",
            used_reserved(&mut quota, &tenant).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state: String =
        sqlx::query_scalar("SELECT state FROM quota_reservations WHERE reservation_id = $1")
            .bind(&held.reservation_id)
            .fetch_one(&app.pool)
            .await
            .expect("reservation");

    assert_eq!(state, "settled");
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_retried_reserve_holds_once_and_release_frees_the_hold() {
    let app = spawn_app().await;
    let (_, mut quota, tenant, _) = with_policy(&app, 1000, pb::QuotaEnforcement::Hard, &[]).await;

    let mut keyed = reserve_request(&tenant, 70);
    keyed.idempotency_key = Some("req-1".into());
    let d = reserve(&mut quota, keyed.clone()).await;
    let retried = reserve(&mut quota, keyed).await;
    let held_once = used_reserved(&mut quota, &tenant).await;
    let release = |reservation_id: String| pb::ReleaseRequest {
        tenant_id: tenant.clone(),
        reservation_id,
    };
    let released = quota
        .release(release(d.reservation_id.clone()))
        .await
        .expect("release")
        .into_inner();
    let released_again = quota
        .release(release(d.reservation_id.clone()))
        .await
        .expect("release again")
        .into_inner();
    let after_d = used_reserved(&mut quota, &tenant).await;

    assert_eq!(retried.reservation_id, d.reservation_id);
    assert_eq!(held_once, (0, 70));
    assert_eq!(released.state(), pb::ReservationState::Released);
    assert_eq!(released_again.state(), pb::ReservationState::Released);
    assert_eq!(after_d, (0, 0));
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn agent_and_service_policies_limit_only_their_subject() {
    let app = spawn_app().await;
    let (_, mut quota, tenant, _) =
        with_policy(&app, 1_000_000, pb::QuotaEnforcement::Hard, &[]).await;
    let scoped = |scope| pb::QuotaPolicy {
        subject: Some(pb::QuotaSubject {
            tenant_id: tenant.clone(),
            scope: Some(scope),
        }),
        ..token_policy(&tenant, 50, pb::QuotaEnforcement::Hard, &[])
    };
    let agent_policy = create(
        &mut quota,
        scoped(pb::quota_subject::Scope::AgentId("agent-7".into())),
    )
    .await;
    let service_policy = create(
        &mut quota,
        scoped(pb::quota_subject::Scope::Service("travel".into())),
    )
    .await;
    let call = |agent: &str, service: Option<&str>| pb::ReserveRequest {
        agent_id: agent.to_owned(),
        service: service.map(str::to_owned),
        ..reserve_request(&tenant, 100)
    };

    let other_agent = reserve(&mut quota, call("agent-1", None)).await;
    let limited_agent = reserve(&mut quota, call("agent-7", None)).await;
    let limited_service = reserve(&mut quota, call("agent-1", Some("travel"))).await;

    assert_eq!(other_agent.decision(), pb::QuotaDecision::Allow);
    assert_eq!(other_agent.policies.len(), 1);
    assert_eq!(limited_agent.decision(), pb::QuotaDecision::Deny);
    assert_eq!(
        limited_agent.denial.expect("denial").policy_id,
        agent_policy
    );
    assert_eq!(limited_service.decision(), pb::QuotaDecision::Deny);
    assert_eq!(
        limited_service.denial.expect("denial").policy_id,
        service_policy
    );
    // Denied calls held nothing, on any policy.
    assert_eq!(tokens(limited_agent.policies[0].reserved.as_ref()), 100);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn usage_without_a_reservation_counts_and_a_soft_limit_allows_and_flags() {
    let app = spawn_app().await;
    let (mut api, mut quota, tenant, _) =
        with_policy(&app, 100, pb::QuotaEnforcement::Soft, &[]).await;
    api.ingest(vec![usage_now(&tenant, 90)]).await;

    let within = reserve(&mut quota, reserve_request(&tenant, 10)).await;
    let over = reserve(&mut quota, reserve_request(&tenant, 20)).await;

    assert_eq!(within.decision(), pb::QuotaDecision::Allow);
    assert!(!within.policies[0].over_limit);
    assert_eq!(over.decision(), pb::QuotaDecision::AllowSoftLimit);
    assert!(!over.reservation_id.is_empty());
    assert!(over.policies[0].over_limit);
    assert_eq!(tokens(over.policies[0].used.as_ref()), 90);
    assert_eq!(tokens(over.policies[0].reserved.as_ref()), 30);
    assert_eq!(tokens(over.policies[0].remaining.as_ref()), -20);
    let metrics = app.metrics().await;
    for line in [
        "tokenmeter_quota_decisions_total{decision=\"allow\"} 1",
        "tokenmeter_quota_decisions_total{decision=\"allow_soft_limit\"} 1",
        "tokenmeter_quota_decisions_total{decision=\"deny\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing");
    }
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn each_threshold_fires_once_even_with_concurrent_crossers() {
    let topic = create_topic(1).await;
    let app = spawn_app_with(|s| {
        s.quota.alerts.topic = topic.clone();
        s.quota.alerts.interval = Duration::from_millis(100);
    })
    .await;
    let mut api = Clients::new(app.channel().await);
    let mut quota = quota_client(app.channel().await);
    let tenant = api.tenant("USD", "UTC", None).await;
    let policy_id = create(
        &mut quota,
        token_policy(
            &tenant,
            1000,
            pb::QuotaEnforcement::Soft,
            &[5000, 8000, 10000],
        ),
    )
    .await;

    // 20 concurrent calls of 100 tokens take used from 0 to 2000.
    let mut crossers = Vec::new();
    for _ in 0..20 {
        let (mut api, tenant) = (Clients::new(app.channel().await), tenant.clone());
        crossers.push(tokio::spawn(async move {
            api.ingest(vec![usage_now(&tenant, 100)]).await;
        }));
    }
    for crosser in crossers {
        crosser.await.expect("crosser");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let unpublished: i64 =
            sqlx::query_scalar("SELECT count(*) FROM quota_alerts WHERE published_at IS NULL")
                .fetch_one(&app.pool)
                .await
                .expect("count");
        if unpublished == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "alerts not published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recorded: Vec<i32> = sqlx::query_scalar(
        "SELECT threshold_bps FROM quota_alerts WHERE policy_id = $1 ORDER BY 1",
    )
    .bind(&policy_id)
    .fetch_all(&app.pool)
    .await
    .expect("outbox");
    let published: Vec<pb::QuotaAlertEvent> = read_all(&topic, 3)
        .await
        .iter()
        .map(|m| pb::QuotaAlertEvent::decode(m.payload().unwrap_or_default()).expect("alert"))
        .collect();
    let shown = status(&mut quota, &tenant).await;

    assert_eq!(recorded, vec![5000, 8000, 10000]);
    let mut thresholds: Vec<i32> = published.iter().map(|a| a.threshold_bps).collect();
    thresholds.sort_unstable();
    assert_eq!(thresholds, vec![5000, 8000, 10000]);
    for alert in &published {
        assert_eq!(alert.policy_id, policy_id);
        let crossed = tokens(alert.used.as_ref());
        assert!(crossed * 10_000 >= 1000 * i64::from(alert.threshold_bps));
    }
    assert_eq!(
        shown[0]
            .thresholds_crossed
            .iter()
            .map(|c| c.threshold_bps)
            .collect::<Vec<_>>(),
        vec![5000, 8000, 10000]
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_money_limit_prices_holds_with_the_rate_in_force_and_denies_unpriced_models() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let mut quota = quota_client(app.channel().await);
    let book = unique("book");
    let input = pb::TokenClass::Input;
    api.version(
        &book,
        "USD",
        hour(48),
        &[("gpt-4.1-mini", input, "1.00", "0.5")],
    )
    .await;
    api.version(
        &book,
        "USD",
        hour(1),
        &[("gpt-4.1-mini", input, "2.00", "0.5")],
    )
    .await;
    let tenant = api.tenant("USD", "UTC", Some(&book)).await;
    let mut policy = token_policy(&tenant, 1, pb::QuotaEnforcement::Hard, &[]);
    policy.limit = Some(pb::QuotaLimit {
        kind: Some(pb::quota_limit::Kind::Money(pb::Money {
            amount: "5".into(),
            currency: "USD".into(),
        })),
    });
    create(&mut quota, policy).await;

    // 1M input tokens at the current 2.00 per 1M: two fit under 5, a third does not.
    let first = reserve(&mut quota, reserve_request(&tenant, 1_000_000)).await;
    let second = reserve(&mut quota, reserve_request(&tenant, 1_000_000)).await;
    let third = reserve(&mut quota, reserve_request(&tenant, 1_000_000)).await;
    let mut unknown = reserve_request(&tenant, 10);
    unknown.model = "no-such-model".into();
    let unpriced = reserve(&mut quota, unknown).await;

    let amount = |r: &pb::ReserveResponse| -> rust_decimal::Decimal {
        r.reserved_amount
            .as_ref()
            .expect("amount")
            .amount
            .parse()
            .expect("decimal")
    };
    assert_eq!(first.decision(), pb::QuotaDecision::Allow);
    assert_eq!(amount(&first), rust_decimal::Decimal::from(2));
    assert_eq!(second.decision(), pb::QuotaDecision::Allow);
    assert_eq!(third.decision(), pb::QuotaDecision::Deny);
    let denial = third.denial.expect("denial");
    assert_eq!(denial.reason(), pb::QuotaDenialReason::LimitExceeded);
    assert_eq!(money(third.policies[0].reserved.as_ref()), 4.into());
    assert_eq!(
        unpriced.denial.expect("denial").reason(),
        pb::QuotaDenialReason::UnpricedModel
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_day_window_starts_at_local_midnight_of_the_tenant_zone() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let mut quota = quota_client(app.channel().await);
    let zone = chrono_tz::Asia::Kathmandu; // UTC+05:45: midnight is on no UTC hour
    let tenant = api.tenant("USD", "Asia/Kathmandu", None).await;
    create(
        &mut quota,
        token_policy(&tenant, 1_000_000, pb::QuotaEnforcement::Hard, &[]),
    )
    .await;
    let today = Utc::now().with_timezone(&zone).date_naive();
    let midnight: DateTime<Utc> = zone
        .from_local_datetime(&today.and_hms_opt(0, 0, 0).expect("midnight"))
        .single()
        .expect("kathmandu has no DST")
        .with_timezone(&Utc);
    let at = |instant: DateTime<Utc>, input| {
        let mut e = event(&tenant, &unique("e"), input, 0);
        e.occurred_at = Some(ts(instant));
        e
    };

    api.ingest(vec![
        at(midnight - chrono::Duration::microseconds(1), 7),
        at(midnight, 11),
    ])
    .await;
    let shown = status(&mut quota, &tenant).await;

    assert_eq!(shown[0].window_start, Some(ts(midnight)));
    assert_eq!(
        shown[0].window_end,
        Some(ts(midnight + chrono::Duration::days(1)))
    );
    assert_eq!(tokens(shown[0].used.as_ref()), 11);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn policies_are_validated_retried_idempotently_and_updated_by_revision() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let mut quota = quota_client(app.channel().await);
    let tenant = api.tenant("EUR", "UTC", None).await;
    let mut zero = token_policy(&tenant, 0, pb::QuotaEnforcement::Hard, &[]);
    zero.policy_id = "p".into();
    let mut unspecified = token_policy(&tenant, 5, pb::QuotaEnforcement::Unspecified, &[]);
    unspecified.policy_id = "p".into();
    let mut dollars = token_policy(&tenant, 5, pb::QuotaEnforcement::Hard, &[]);
    dollars.limit = Some(pb::QuotaLimit {
        kind: Some(pb::quota_limit::Kind::Money(pb::Money {
            amount: "5".into(),
            currency: "USD".into(),
        })),
    });
    let mut good = token_policy(&tenant, 5, pb::QuotaEnforcement::Hard, &[8000]);
    good.policy_id = "p".into();
    let checker = quota.clone();
    let create_err = |policy: pb::QuotaPolicy| {
        let mut quota = checker.clone();
        async move {
            quota
                .create_quota_policy(pb::CreateQuotaPolicyRequest {
                    policy: Some(policy),
                })
                .await
                .expect_err("invalid")
        }
    };

    let errors = [
        create_err(zero).await,
        create_err(unspecified).await,
        create_err(dollars).await,
    ];
    let created = create(&mut quota, good.clone()).await;
    let replayed = create(&mut quota, good.clone()).await;
    let mut different = good.clone();
    different.name = "other".into();
    let clash = create_err(different).await;
    let update = |expected, paths: &[&str]| pb::UpdateQuotaPolicyRequest {
        policy: Some(pb::QuotaPolicy {
            disabled: true,
            ..good.clone()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
        expected_revision: expected,
    };
    let stale = quota
        .update_quota_policy(update(Some(7), &["disabled"]))
        .await
        .expect_err("stale");
    let immutable = quota
        .update_quota_policy(update(None, &["window"]))
        .await
        .expect_err("immutable");
    let updated = quota
        .update_quota_policy(update(Some(1), &["disabled"]))
        .await
        .expect("update")
        .into_inner()
        .policy
        .expect("policy");
    let listed = quota
        .list_quota_policies(pb::ListQuotaPoliciesRequest {
            tenant_id: tenant.clone(),
            include_disabled: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .policies;
    quota
        .delete_quota_policy(pb::DeleteQuotaPolicyRequest {
            tenant_id: tenant.clone(),
            policy_id: "p".into(),
            expected_revision: Some(2),
        })
        .await
        .expect("delete");
    let gone = quota
        .get_quota_policy(pb::GetQuotaPolicyRequest {
            tenant_id: tenant.clone(),
            policy_id: "p".into(),
        })
        .await
        .expect_err("deleted");

    let described: Vec<(Code, String)> = errors
        .iter()
        .map(|s| (s.code(), s.message().to_owned()))
        .collect();
    assert_eq!(described[0].0, Code::InvalidArgument);
    assert!(
        described[0].1.starts_with("policy.limit.tokens.limit:"),
        "{described:?}"
    );
    assert!(
        described[1].1.starts_with("policy.enforcement:"),
        "{described:?}"
    );
    assert!(
        described[2].1.starts_with("policy.limit.money.currency:"),
        "{described:?}"
    );
    assert_eq!((created.as_str(), replayed.as_str()), ("p", "p"));
    assert_eq!(clash.code(), Code::AlreadyExists);
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(immutable.code(), Code::InvalidArgument);
    assert!((updated.disabled, updated.revision) == (true, 2));
    assert_eq!(listed.len(), 1);
    assert_eq!(gone.code(), Code::NotFound);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn quota_commands_create_list_show_and_delete_policies() {
    let url = create_database().await;
    let run = |args: &[&str]| {
        let output = tokenmeter_command()
            .args(args)
            .env("TOKENMETER_DATABASE__URL", &url)
            .output()
            .expect("run tokenmeter");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert!(run(&["migrate"]).0);
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    sqlx::query("INSERT INTO tenants (tenant_id, name, currency) VALUES ('acme', 'Acme', 'USD')")
        .execute(&pool)
        .await
        .expect("tenant");

    let created = run(&[
        "quota",
        "create",
        "--tenant",
        "acme",
        "--window",
        "day",
        "--tokens",
        "1000",
        "--enforcement",
        "hard",
        "--thresholds",
        "8000,10000",
        "--id",
        "daily",
    ]);
    let bad_window = run(&[
        "quota",
        "create",
        "--tenant",
        "acme",
        "--window",
        "fortnight",
        "--tokens",
        "1000",
        "--enforcement",
        "hard",
    ]);
    let listed = run(&["quota", "list", "--tenant", "acme"]);
    let status = run(&["quota", "status", "--tenant", "acme"]);
    let deleted = run(&["quota", "delete", "--tenant", "acme", "--policy", "daily"]);
    let after = run(&["quota", "list", "--tenant", "acme"]);

    assert!(created.0, "{}", created.2);
    assert!(
        created
            .1
            .starts_with("daily\ttenant acme\tday\t1000 tokens\thard"),
        "{}",
        created.1
    );
    assert!(!bad_window.0);
    assert!(bad_window.2.contains("--window"), "{}", bad_window.2);
    assert_eq!(listed.1, created.1);
    assert!(
        status
            .1
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("daily\t0\t0\t1000\t")),
        "{}",
        status.1
    );
    assert_eq!(deleted.1.trim(), "deleted daily");
    assert_eq!(after.1, "");
}

/// Reserves `size` at a time, held for `ttl` seconds if given, until denied; returns what was
/// granted.
async fn drain(
    quota: &mut QuotaServiceClient<Authed>,
    tenant: &str,
    size: i64,
    ttl: Option<i64>,
) -> i64 {
    let mut granted = 0;
    let mut request = reserve_request(tenant, size);
    request.ttl = ttl.map(|seconds| prost_types::Duration { seconds, nanos: 0 });
    while reserve(quota, request.clone()).await.decision() == pb::QuotaDecision::Allow {
        granted += size;
    }
    granted
}

#[tokio::test]
async fn a_replica_killed_holding_a_slice_overspends_nothing_and_the_slice_returns_at_its_reclaim_time()
 {
    const LIMIT: i64 = 1000;
    // A lease lives 1 s and a hold at most 5 s: a dead replica's slice returns 6 s after it
    // asked for it. Holds live 2 s unless a call asks for more.
    let settings = [
        ("TOKENMETER_QUOTA__LEASE_TTL", "1s"),
        ("TOKENMETER_QUOTA__MAX_TTL", "5s"),
        ("TOKENMETER_QUOTA__DEFAULT_TTL", "2s"),
        ("TOKENMETER_QUOTA__EXPIRY_INTERVAL", "100ms"),
    ];
    let url = create_database().await;
    let mut doomed = spawn_serve(&url, &settings).await;
    let survivor = spawn_serve(&url, &settings).await;
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let mut admin = Clients::new(doomed.channel().await);
    let tenant = admin.tenant("USD", "UTC", None).await;
    let mut on_doomed = quota_client(doomed.channel().await);
    let mut on_survivor = quota_client(survivor.channel().await);
    create(
        &mut on_doomed,
        token_policy(&tenant, LIMIT, pb::QuotaEnforcement::Hard, &[]),
    )
    .await;

    // The doomed replica leases a quarter of the budget (250) and grants 100 of it.
    let leased_at = std::time::Instant::now();
    let held = reserve(&mut on_doomed, reserve_request(&tenant, 100)).await;
    let before_kill = status(&mut on_doomed, &tenant).await;
    let doomed_replica: uuid::Uuid = sqlx::query_scalar("SELECT replica_id FROM quota_leases")
        .fetch_one(&pool)
        .await
        .expect("the doomed replica's lease");
    doomed.child().kill().expect("kill -9");
    doomed.child().wait().expect("reap");
    let right_after = drain(&mut on_survivor, &tenant, 50, None).await;
    // Every hold so far has lapsed; the dead replica's unused slice has not come back yet.
    tokio::time::sleep(
        (leased_at + Duration::from_millis(3500)).duration_since(std::time::Instant::now()),
    )
    .await;
    let holds_lapsed = drain(&mut on_survivor, &tenant, 50, Some(5)).await;
    let mut reclaimed_after = None;
    while reclaimed_after.is_none() {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM quota_leases WHERE replica_id = $1")
                .bind(doomed_replica)
                .fetch_one(&pool)
                .await
                .expect("leases");
        if left == 0 {
            reclaimed_after = Some(leased_at.elapsed());
        } else {
            assert!(
                leased_at.elapsed() < Duration::from_secs(20),
                "never reclaimed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let after_reclaim = drain(&mut on_survivor, &tenant, 50, Some(5)).await;
    let end = status(&mut on_survivor, &tenant).await;

    assert_eq!(held.decision(), pb::QuotaDecision::Allow);
    assert_eq!(tokens(before_kill[0].reserved.as_ref()), 100);
    assert_eq!(tokens(before_kill[0].leased.as_ref()), 150);
    // Everything but the dead replica's hold and unused slice, and not a token more.
    assert_eq!(right_after, LIMIT - 250);
    assert_eq!(holds_lapsed, LIMIT - 150);
    let reclaimed_after = reclaimed_after.expect("reclaimed");
    assert!(
        reclaimed_after >= Duration::from_secs(6),
        "reclaimed after {reclaimed_after:?}"
    );
    assert_eq!(after_reclaim, 150);
    assert_eq!(tokens(end[0].reserved.as_ref()), LIMIT);
    assert_eq!(tokens(end[0].remaining.as_ref()), 0);
}

#[tokio::test]
async fn usage_settle_and_release_before_a_grant_is_written_leave_no_phantom_hold() {
    // Grants wait half a second before they are written, so every call below comes first.
    let app = spawn_app_with(|s| s.quota.flush_interval = Duration::from_millis(500)).await;
    let (mut api, mut quota, tenant, _) =
        with_policy(&app, 10_000, pb::QuotaEnforcement::Hard, &[]).await;

    let by_usage = reserve(&mut quota, reserve_request(&tenant, 100)).await;
    let mut usage = usage_now(&tenant, 60);
    usage.reservation_id = Some(by_usage.reservation_id.clone());
    api.ingest(vec![usage]).await;
    let after_usage = used_reserved(&mut quota, &tenant).await;

    let by_counts = reserve(&mut quota, reserve_request(&tenant, 200)).await;
    let settled = quota
        .settle(pb::SettleRequest {
            tenant_id: tenant.clone(),
            reservation_id: by_counts.reservation_id.clone(),
            actual: Some(pb::settle_request::Actual::ActualTokens(pb::TokenCounts {
                input: 80,
                ..Default::default()
            })),
        })
        .await
        .expect("settle before the write")
        .into_inner();
    let after_counts = used_reserved(&mut quota, &tenant).await;

    let released = reserve(&mut quota, reserve_request(&tenant, 50)).await;
    let release = quota
        .release(pb::ReleaseRequest {
            tenant_id: tenant.clone(),
            reservation_id: released.reservation_id.clone(),
        })
        .await
        .expect("release before the write")
        .into_inner();
    let after_release = used_reserved(&mut quota, &tenant).await;
    let states: Vec<(String, String)> = sqlx::query_as(
        "SELECT reservation_id, state FROM quota_reservations ORDER BY reservation_id",
    )
    .fetch_all(&app.pool)
    .await
    .expect("reservations");

    assert_eq!(after_usage, (60, 0));
    assert_eq!(settled.state(), pb::ReservationState::Settled);
    assert_eq!(after_counts, (140, 0));
    assert_eq!(release.state(), pb::ReservationState::Released);
    assert_eq!(after_release, (140, 0));
    assert_eq!(
        states,
        vec![
            (by_usage.reservation_id, "settled".to_owned()),
            (by_counts.reservation_id, "settled".to_owned()),
            (released.reservation_id, "released".to_owned()),
        ]
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_limit_lowered_while_slices_are_out_binds_new_grants_within_the_policy_cache_ttl() {
    let app = spawn_app_with(|s| s.quota.policy_cache_ttl = Duration::from_millis(300)).await;
    let (_, mut quota, tenant, policy_id) =
        with_policy(&app, 1000, pb::QuotaEnforcement::Hard, &[]).await;
    // Leases a quarter (250) and grants 100 of it.
    let first = reserve(&mut quota, reserve_request(&tenant, 100)).await;

    let changed_at = std::time::Instant::now();
    set_limit(&mut quota, &tenant, &policy_id, 150).await;
    // Until the cache turns over, grants may still come from the slice leased under 1000: at
    // most its unused 150.
    let mut meanwhile = Vec::new();
    while changed_at.elapsed() < Duration::from_millis(200) {
        let answer = reserve(&mut quota, reserve_request(&tenant, 50)).await;
        if answer.decision() == pb::QuotaDecision::Allow {
            meanwhile.push(answer.reservation_id);
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after_ttl = reserve(&mut quota, reserve_request(&tenant, 1)).await;
    let release = |reservation_id: String| pb::ReleaseRequest {
        tenant_id: tenant.clone(),
        reservation_id,
    };
    quota
        .release(release(first.reservation_id.clone()))
        .await
        .expect("release");
    for id in meanwhile.iter().cloned() {
        quota.release(release(id)).await.expect("release");
    }
    let whole_new_limit = reserve(&mut quota, reserve_request(&tenant, 150)).await;
    let one_more = reserve(&mut quota, reserve_request(&tenant, 1)).await;
    let end = status(&mut quota, &tenant).await;

    assert_eq!(first.decision(), pb::QuotaDecision::Allow);
    assert!(meanwhile.len() as i64 * 50 <= 150, "{meanwhile:?}");
    assert_eq!(after_ttl.decision(), pb::QuotaDecision::Deny);
    assert_eq!(whole_new_limit.decision(), pb::QuotaDecision::Allow);
    assert_eq!(one_more.decision(), pb::QuotaDecision::Deny);
    assert_eq!(tokens(end[0].reserved.as_ref()), 150);
    assert_eq!(tokens(end[0].remaining.as_ref()), 0);
    app.stop().await.expect("clean shutdown");
}

/// Changes the token limit of a tenant-wide policy (its revision moves on).
async fn set_limit(
    quota: &mut QuotaServiceClient<Authed>,
    tenant: &str,
    policy_id: &str,
    limit: i64,
) {
    let mut changed = token_policy(tenant, limit, pb::QuotaEnforcement::Hard, &[]);
    changed.policy_id = policy_id.to_owned();
    quota
        .update_quota_policy(pb::UpdateQuotaPolicyRequest {
            policy: Some(changed),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["limit".into()],
            }),
            expected_revision: None,
        })
        .await
        .expect("change the limit");
}

/// A lease that finds one policy changed makes the replica reload the tenant's policies
/// without an entry to compare them with; every slice of the tenant lapses then, so a limit
/// lowered meanwhile binds the next grant instead of the slice leased under the old one.
#[tokio::test]
async fn a_reload_after_a_changed_policy_lapses_every_slice_of_the_tenant() {
    // Long enough that only the changed policy's lease makes the replica reload.
    let app = spawn_app_with(|s| s.quota.policy_cache_ttl = Duration::from_secs(60)).await;
    let (_, mut quota, tenant, small) =
        with_policy(&app, 100, pb::QuotaEnforcement::Hard, &[]).await;
    let large = create(
        &mut quota,
        token_policy(&tenant, 4000, pb::QuotaEnforcement::Hard, &[]),
    )
    .await;
    // `small`'s slice is all of its 100, granted; `large` leases more than the call needs.
    let first = reserve(&mut quota, reserve_request(&tenant, 100)).await;
    assert_eq!(first.decision(), pb::QuotaDecision::Allow);

    // `small` grows and `large` shrinks to 150, 100 of which are held.
    set_limit(&mut quota, &tenant, &small, 10_000).await;
    set_limit(&mut quota, &tenant, &large, 150).await;
    // `small`'s slice is empty, so this call leases and finds `small` changed.
    let second = reserve(&mut quota, reserve_request(&tenant, 100)).await;

    assert_eq!(second.decision(), pb::QuotaDecision::Deny, "{second:?}");
    assert_eq!(second.denial.expect("denial").policy_id, large);
    let end = status(&mut quota, &tenant).await;
    let large_now = end.iter().find(|p| p.policy_id == large).expect("large");
    assert_eq!(tokens(large_now.reserved.as_ref()), 100);
    assert_eq!(tokens(large_now.remaining.as_ref()), 50);
    app.stop().await.expect("clean shutdown");
}

/// The value of the counter `name{label="value"}` on `app`.
async fn counter(app: &TestApp, name: &str, label: &str, value: &str) -> u64 {
    let metrics = app.metrics().await;
    let prefix = format!("{name}{{{label}=\"{value}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{prefix}in the metrics"))
        .parse()
        .expect("count")
}

async fn lease_transactions(app: &TestApp, outcome: &str) -> u64 {
    counter(
        app,
        "tokenmeter_quota_lease_transactions_total",
        "outcome",
        outcome,
    )
    .await
}

#[tokio::test]
async fn a_busy_tenant_reloads_its_policies_ahead_without_making_calls_wait() {
    let app = spawn_app_with(|s| s.quota.policy_cache_ttl = Duration::from_millis(1000)).await;
    let (_, mut quota, tenant, _) =
        with_policy(&app, 1_000_000, pb::QuotaEnforcement::Hard, &[]).await;
    let loads = |when: &'static str| {
        let app = &app;
        async move { counter(app, "tokenmeter_quota_policy_loads_total", "when", when).await }
    };

    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(2600) {
        let answer = reserve(&mut quota, reserve_request(&tenant, 1)).await;
        assert_eq!(answer.decision(), pb::QuotaDecision::Allow);
    }

    // The first call found nothing cached and waited for the load; after that the policies
    // were reloaded each half TTL (at about 0.5, 1.0, … 2.5 s) by one call while the others
    // went on, so no call waited again.
    assert_eq!(loads("waited").await, 1);
    assert!(
        loads("ahead").await >= 3,
        "{} loads ahead",
        loads("ahead").await
    );
    app.stop().await.expect("clean shutdown");
}

/// An app caching policies for 2 s, and a tenant with a hard budget. The slice stays out (not
/// given back as idle), so granting needs no lease transaction, which would read the policies
/// too: only the policy cache's reloads do.
async fn policies_cached_for_two_seconds() -> (TestApp, QuotaServiceClient<Authed>, String) {
    let app = spawn_app_with(|s| {
        s.quota.policy_cache_ttl = Duration::from_secs(2);
        s.quota.lease_idle = Duration::from_secs(60);
    })
    .await;
    let (_, quota, tenant, _) = with_policy(&app, 1_000_000, pb::QuotaEnforcement::Hard, &[]).await;
    (app, quota, tenant)
}

#[tokio::test]
async fn a_failed_reload_ahead_keeps_the_cached_policies_until_their_ttl() {
    let (app, mut quota, tenant) = policies_cached_for_two_seconds().await;
    let rename = |from: &str, to: &str| {
        let sql = format!("ALTER TABLE {from} RENAME TO {to}");
        let pool = app.pool.clone();
        async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .expect("rename the policies table");
        }
    };
    // Loads the policies (and leases a slice that covers the calls below).
    let loaded_at = std::time::Instant::now();
    let first = reserve(&mut quota, reserve_request(&tenant, 1)).await;
    assert_eq!(first.decision(), pb::QuotaDecision::Allow);

    // From now on every reload fails.
    rename("quota_policies", "quota_policies_away").await;
    // Past half the TTL the call that reloads ahead fails to; it and the others still get
    // answers from the cached policies.
    tokio::time::sleep_until((loaded_at + Duration::from_millis(1200)).into()).await;
    let ahead = quota.reserve(reserve_request(&tenant, 1)).await;
    // Past the TTL the calls must wait for a reload, which fails.
    tokio::time::sleep_until((loaded_at + Duration::from_millis(2300)).into()).await;
    let expired = quota.reserve(reserve_request(&tenant, 1)).await;
    rename("quota_policies_away", "quota_policies").await;
    let restored = reserve(&mut quota, reserve_request(&tenant, 1)).await;

    let ahead = ahead.expect("answered from the cache").into_inner();
    assert_eq!(ahead.decision(), pb::QuotaDecision::Allow);
    assert!(expired.is_err(), "{expired:?}");
    assert_eq!(restored.decision(), pb::QuotaDecision::Allow);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_reload_ahead_that_fails_after_the_ttl_serves_no_stale_policies() {
    let (app, mut quota, tenant) = policies_cached_for_two_seconds().await;
    let first = reserve(&mut quota, reserve_request(&tenant, 1)).await;
    assert_eq!(first.decision(), pb::QuotaDecision::Allow);
    // The policies were loaded before this instant: the ages below are at least these.
    let loaded_at = std::time::Instant::now();

    // Past half the TTL a reload ahead starts and blocks on a lock held here …
    tokio::time::sleep_until((loaded_at + Duration::from_millis(1100)).into()).await;
    let mut locker = app.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE quota_policies IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .expect("lock the policies");
    let ahead = {
        let (mut quota, request) = (quota.clone(), reserve_request(&tenant, 1));
        tokio::spawn(async move { quota.reserve(request).await })
    };
    // … and fails only once the cached policies are past their TTL: its backend is ended.
    tokio::time::sleep_until((loaded_at + Duration::from_millis(2300)).into()).await;
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut *locker)
    .await
    .expect("end the blocked reload");
    locker.rollback().await.expect("release the lock");
    let ahead = ahead.await.expect("the call ran");
    let restored = reserve(&mut quota, reserve_request(&tenant, 1)).await;

    assert_eq!(ended, vec![true], "exactly the reload waited on the lock");
    assert!(
        ahead.is_err(),
        "policies past their TTL were used after a slow failure: {ahead:?}"
    );
    assert_eq!(restored.decision(), pb::QuotaDecision::Allow);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_exhausted_budget_denies_from_memory_after_its_slice_lapsed() {
    // Slices are valid for three quarters of 400 ms.
    let app = spawn_app_with(|s| s.quota.lease_ttl = Duration::from_millis(400)).await;
    let (_, mut quota, tenant, _) = with_policy(&app, 1000, pb::QuotaEnforcement::Hard, &[]).await;
    let mut allowed = 0;
    while reserve(&mut quota, reserve_request(&tenant, 100))
        .await
        .decision()
        == pb::QuotaDecision::Allow
    {
        allowed += 1;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = lease_transactions(&app, "exhausted").await;

    let started = std::time::Instant::now();
    let callers: Vec<_> = (0..10)
        .map(|_| {
            let mut quota = quota.clone();
            let tenant = tenant.clone();
            tokio::spawn(async move {
                let mut decisions = Vec::new();
                for _ in 0..30 {
                    decisions.push(reserve(&mut quota, reserve_request(&tenant, 100)).await);
                }
                decisions
            })
        })
        .collect();
    let mut denied = 0;
    for caller in callers {
        for answer in caller.await.expect("caller") {
            assert_eq!(answer.decision(), pb::QuotaDecision::Deny, "{answer:?}");
            denied += 1;
        }
    }
    let elapsed = started.elapsed();
    let transactions = lease_transactions(&app, "exhausted").await - before;

    assert_eq!(allowed, 10);
    assert_eq!(denied, 300);
    // One transaction finds the budget spent again, then calls deny from memory for 100 ms at
    // a time: not one transaction per denied call, as when the lapsed slice was ignored.
    let windows = u64::try_from(elapsed.as_millis() / 100).expect("windows");
    assert!(
        transactions <= windows + 2,
        "{transactions} lease transactions for 300 denials in {elapsed:?}"
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_graceful_stop_writes_every_grant_and_gives_every_slice_back() {
    let app = spawn_app().await;
    let (_, mut quota, tenant, _) = with_policy(&app, 1000, pb::QuotaEnforcement::Hard, &[]).await;
    let options = (*app.pool.connect_options()).clone();
    let granted = reserve(&mut quota, reserve_request(&tenant, 100)).await;

    app.stop().await.expect("clean shutdown");
    let pool = sqlx::PgPool::connect_with(options)
        .await
        .expect("reconnect");
    let (reserved, leased): (rust_decimal::Decimal, rust_decimal::Decimal) =
        sqlx::query_as("SELECT reserved, leased FROM quota_counters")
            .fetch_one(&pool)
            .await
            .expect("counter");
    let written: i64 =
        sqlx::query_scalar("SELECT count(*) FROM quota_reservations WHERE reservation_id = $1")
            .bind(&granted.reservation_id)
            .fetch_one(&pool)
            .await
            .expect("reservation");

    assert_eq!((reserved, leased), (100.into(), 0.into()));
    assert_eq!(written, 1);
}
