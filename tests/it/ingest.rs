//! Usage ingest over gRPC against the real Postgres: exactly-once, conflicts, validation,
//! pricing, rollups and usage queries.

use chrono::Duration;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokenmeter::proto::v1 as pb;
use tokenmeter::proto::v1::IngestStatus::{Accepted, Conflict, Duplicate, Invalid};

use crate::helpers::{TestApp, folded, spawn_app, spawn_app_with};
use crate::usage_support::{Clients, event, hour, statuses, ts, unique};

fn dec(text: &str) -> Decimal {
    text.parse().expect("decimal")
}

#[tokio::test]
async fn accepted_events_roll_up_and_a_resent_batch_comes_back_duplicate() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let tenant = unique("t");
    let batch = vec![
        event(&tenant, "e1", 100, 10),
        event(&tenant, "e2", 200, 20),
        event(&tenant, "e3", 300, 0),
    ];

    let first = api.ingest(batch.clone()).await;
    let second = api.ingest(batch).await;

    assert_eq!(statuses(&first), vec![Accepted, Accepted, Accepted]);
    assert_eq!(statuses(&second), vec![Duplicate, Duplicate, Duplicate]);
    let rows = api.usage(&tenant, &[]).await;
    assert_eq!(rows.len(), 1);
    let tokens = rows[0].tokens.expect("tokens");
    assert_eq!(tokens.input, 100 + 200 + 300);
    assert_eq!(tokens.output, 10 + 20);
    assert_eq!(rows[0].total_tokens, 630);
    assert_eq!(rows[0].event_count, 3);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE tenant_id = $1")
        .bind(&tenant)
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(stored, 3);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn same_identity_with_another_payload_is_a_conflict_kept_for_audit() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let tenant = unique("t");
    api.ingest(vec![event(&tenant, "e1", 100, 10)]).await;

    let mut retimed = event(&tenant, "e1", 100, 10);
    retimed.occurred_at = Some(ts(hour(30)));
    let mut other_source = event(&tenant, "e1", 5, 5);
    other_source.source = "another-producer".into();
    let response = api
        .ingest(vec![
            retimed,
            event(&tenant, "e1", 999, 10),
            event(&tenant, "e1", 100, 10),
            other_source,
            event(&tenant, "e2", 1, 1),
            event(&tenant, "e2", 2, 2),
        ])
        .await;

    assert_eq!(
        statuses(&response),
        vec![Conflict, Conflict, Duplicate, Accepted, Accepted, Conflict]
    );
    // Each conflict names the first field that differs from the delivery that won: a stored
    // event for e1, the earlier event of this batch for e2.
    let named: Vec<&str> = response.results.iter().map(|r| r.field.as_str()).collect();
    assert_eq!(
        named,
        vec!["occurred_at", "tokens.input", "", "", "", "tokens.input"]
    );
    let summary = response.summary.expect("summary");
    assert_eq!(
        (summary.accepted, summary.duplicate, summary.conflict),
        (2, 1, 3)
    );
    let rows = api.usage(&tenant, &[]).await;
    let tokens = rows[0].tokens.expect("tokens");
    assert_eq!(
        tokens.input,
        100 + 5 + 1,
        "conflicts must not change totals"
    );
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT first_differing_field FROM usage_event_conflicts WHERE tenant_id = $1
         ORDER BY first_differing_field",
    )
    .bind(&tenant)
    .fetch_all(&app.pool)
    .await
    .expect("conflicts");
    assert_eq!(audited, vec!["occurred_at", "tokens.input", "tokens.input"]);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_event_stored_before_cache_write_classes_existed_is_a_duplicate_when_resent() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let tenant = unique("t");
    // What the first release stored for an OpenAI Responses call with 1,500 cache-write tokens
    // (it had no classes for them and billed them as input): 5000 − 3000 cached = 2000 input.
    let mut stored = event(&tenant, "call-1", 0, 0);
    stored.usage = Some(pb::usage_event::Usage::Tokens(pb::TokenCounts {
        input: 2_000,
        cache_read: 3_000,
        output: 300,
        reasoning: 600,
        ..Default::default()
    }));
    api.ingest(vec![stored.clone()]).await;
    // The same call resent as its usage object, now normalized with the writes split out.
    let mut resent = stored.clone();
    resent.usage = Some(pb::usage_event::Usage::OpenaiResponses(
        pb::OpenAiResponsesUsage {
            input_tokens: 5_000,
            input_tokens_details: Some(pb::OpenAiInputTokensDetails {
                cached_tokens: 3_000,
                cache_write_tokens: 1_500,
                ..Default::default()
            }),
            output_tokens: 900,
            output_tokens_details: Some(pb::OpenAiOutputTokensDetails {
                reasoning_tokens: 600,
                ..Default::default()
            }),
            total_tokens: Some(5_900),
        },
    ));
    let mut changed = resent.clone();
    if let Some(pb::usage_event::Usage::OpenaiResponses(u)) = &mut changed.usage {
        u.output_tokens = 901;
        u.total_tokens = Some(5_901);
    }

    let response = api.ingest(vec![resent, changed]).await;

    assert_eq!(statuses(&response), vec![Duplicate, Conflict]);
    assert_eq!(response.results[1].field, "tokens.input");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE tenant_id = $1")
        .bind(&tenant)
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(rows, 1);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn invalid_events_get_field_and_reason_and_the_valid_ones_are_still_accepted() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let tenant = unique("t");
    let negative = event(&tenant, "neg", -1, 5);
    let mut no_model = event(&tenant, "nomodel", 1, 1);
    no_model.model.clear();
    let mut no_usage = event(&tenant, "nousage", 1, 1);
    no_usage.usage = None;
    let mut future = event(&tenant, "future", 1, 1);
    future.occurred_at = Some(ts(hour(-3)));
    let mut too_many = event(&tenant, "attrs", 1, 1);
    too_many.attributes = (0..40).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let mut nul = event(&tenant, "nul", 1, 1);
    nul.attributes.insert("note".into(), "a\0b".into());
    let mut cached_over_prompt = event(&tenant, "openai", 0, 0);
    cached_over_prompt.usage = Some(pb::usage_event::Usage::OpenaiChat(pb::OpenAiChatUsage {
        prompt_tokens: 100,
        completion_tokens: 10,
        prompt_tokens_details: Some(pb::OpenAiPromptTokensDetails {
            cached_tokens: 120,
            ..Default::default()
        }),
        ..Default::default()
    }));

    let response = api
        .ingest(vec![
            negative,
            no_model,
            no_usage,
            future,
            too_many,
            nul,
            cached_over_prompt,
            event(&tenant, "good", 7, 3),
        ])
        .await;

    let fields: Vec<(pb::IngestStatus, &str)> = response
        .results
        .iter()
        .map(|r| (r.status(), r.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        vec![
            (Invalid, "tokens.input"),
            (Invalid, "model"),
            (Invalid, "usage"),
            (Invalid, "occurred_at"),
            (Invalid, "attributes"),
            (Invalid, "attributes.note"),
            (Invalid, "openai_chat.prompt_tokens_details.cached_tokens"),
            (Accepted, ""),
        ]
    );
    assert!(
        response
            .results
            .iter()
            .take(7)
            .all(|r| !r.reason.is_empty())
    );
    let rows = api.usage(&tenant, &[]).await;
    assert_eq!(rows[0].event_count, 1);
    assert_eq!(rows[0].total_tokens, 10);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_batch_over_the_limit_is_rejected_naming_the_limit() {
    let app = spawn_app_with(|s| s.ingest.max_batch_events = 3).await;
    let mut api = Clients::new(app.channel().await);
    let tenant = unique("t");
    let events = (0..4)
        .map(|i| event(&tenant, &format!("e{i}"), 1, 1))
        .collect();

    let status = api
        .usage
        .ingest_usage(pb::IngestUsageRequest {
            events,
            omit_accepted_results: false,
        })
        .await
        .expect_err("over the limit");

    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("ingest.max_batch_events"),
        "{status:?}"
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn concurrent_streams_carrying_the_same_events_count_each_once() {
    let app = spawn_app().await;
    let channel = app.channel().await;
    let tenant = unique("t");
    let events: Vec<pb::UsageEvent> = (0..300)
        .map(|i| event(&tenant, &format!("e{i}"), i + 1, 1))
        .collect();

    let mut streams = Vec::new();
    for worker in 0..4u64 {
        let mut client = tokenmeter::proto::v1::usage_service_client::UsageServiceClient::new(
            crate::helpers::authed(channel.clone(), crate::helpers::ADMIN_KEY),
        );
        // Every stream sends all events, each in its own order and chunking.
        let mut mine = events.clone();
        mine.rotate_left(usize::try_from(worker * 70).expect("rotation"));
        let chunk = 17 + usize::try_from(worker).expect("chunk") * 9;
        let messages: Vec<pb::StreamUsageRequest> = mine
            .chunks(chunk)
            .map(|c| pb::StreamUsageRequest {
                events: c.to_vec(),
                omit_accepted_results: true,
            })
            .collect();
        streams.push(tokio::spawn(async move {
            client
                .stream_usage(tokio_stream::iter(messages))
                .await
                .expect("stream")
                .into_inner()
        }));
    }
    let mut accepted = 0;
    let mut duplicate = 0;
    for stream in streams {
        let response = stream.await.expect("join");
        let summary = response.summary.expect("summary");
        accepted += summary.accepted;
        duplicate += summary.duplicate;
        assert!(response.results.iter().all(|r| r.status() == Duplicate));
    }

    assert_eq!(accepted, 300);
    assert_eq!(duplicate, 3 * 300);
    let mut api = Clients::new(channel);
    let rows = api.usage(&tenant, &[]).await;
    let tokens = rows[0].tokens.expect("tokens");
    assert_eq!(tokens.input, (1..=300).sum::<i64>());
    assert_eq!(rows[0].event_count, 300);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn events_are_priced_with_the_version_in_force_at_occurred_at() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let book = unique("book").to_lowercase();
    let switch = hour(5);
    api.version(
        &book,
        "USD",
        hour(48),
        &[
            ("gpt-4.1-mini", pb::TokenClass::Input, "0.40", "0.30"),
            ("gpt-4.1-mini", pb::TokenClass::Output, "1.60", "1.20"),
        ],
    )
    .await;
    api.version(
        &book,
        "USD",
        switch,
        &[
            ("gpt-4.1-mini", pb::TokenClass::Input, "0.50", "0.35"),
            ("gpt-4.1-mini", pb::TokenClass::Output, "2.00", "1.40"),
        ],
    )
    .await;
    let tenant = api.tenant("USD", "UTC", Some(&book)).await;
    let mut before = event(&tenant, "before", 1_000_000, 500_000);
    before.occurred_at = Some(ts(switch - Duration::microseconds(1)));
    let mut at_switch = event(&tenant, "at", 2_000_000, 250_000);
    at_switch.occurred_at = Some(ts(switch));

    let response = api.ingest(vec![before, at_switch]).await;

    assert_eq!(statuses(&response), vec![Accepted, Accepted]);
    let rows = api.usage(&tenant, &[]).await;
    // before: 1M × 0.40 + 0.5M × 1.60 = 0.40 + 0.80 = 1.20 (cost 0.30 + 0.60 = 0.90)
    // at:     2M × 0.50 + 0.25M × 2.00 = 1.00 + 0.50 = 1.50 (cost 0.70 + 0.35 = 1.05)
    assert_eq!(dec(&rows[0].billed_amount), dec("1.20") + dec("1.50"));
    assert_eq!(dec(&rows[0].cost_amount), dec("0.90") + dec("1.05"));
    assert_eq!(rows[0].currency, "USD");
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn tenant_overrides_change_the_price_but_not_the_cost() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let book = unique("book").to_lowercase();
    api.version(
        &book,
        "EUR",
        hour(48),
        &[
            ("gpt-4.1-mini", pb::TokenClass::Input, "0.40", "0.30"),
            ("gpt-4.1-mini", pb::TokenClass::Output, "1.60", "1.20"),
        ],
    )
    .await;
    let own = api.tenant("EUR", "UTC", Some(&book)).await;
    let discounted = api.tenant("EUR", "UTC", Some(&book)).await;
    api.prices
        .create_tenant_price_override(pb::CreateTenantPriceOverrideRequest {
            override_rule: Some(pb::TenantPriceOverride {
                tenant_id: own.clone(),
                provider: "openai".into(),
                model: "gpt-4.1-mini".into(),
                token_class: pb::TokenClass::Input as i32,
                adjustment: Some(pb::tenant_price_override::Adjustment::PricePerMillion(
                    "0.25".into(),
                )),
                effective_from: Some(ts(hour(24))),
                ..Default::default()
            }),
            allow_backdated: true,
        })
        .await
        .expect("own price");
    api.prices
        .create_tenant_price_override(pb::CreateTenantPriceOverrideRequest {
            override_rule: Some(pb::TenantPriceOverride {
                tenant_id: discounted.clone(),
                adjustment: Some(pb::tenant_price_override::Adjustment::DiscountPercent(
                    "12.5".into(),
                )),
                effective_from: Some(ts(hour(24))),
                ..Default::default()
            }),
            allow_backdated: true,
        })
        .await
        .expect("discount");

    api.ingest(vec![event(&own, "e", 1_000_000, 1_000_000)])
        .await;
    api.ingest(vec![event(&discounted, "e", 1_000_000, 1_000_000)])
        .await;

    let own_row = &api.usage(&own, &[]).await[0];
    let discounted_row = &api.usage(&discounted, &[]).await[0];
    // own: input at its own 0.25, output at list 1.60
    assert_eq!(dec(&own_row.billed_amount), dec("0.25") + dec("1.60"));
    // discounted: (0.40 + 1.60) × (1 − 0.125) = 1.75
    assert_eq!(dec(&discounted_row.billed_amount), dec("1.75"));
    for row in [own_row, discounted_row] {
        assert_eq!(dec(&row.cost_amount), dec("0.30") + dec("1.20"));
        assert_eq!(row.currency, "EUR");
    }
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_book_in_another_currency_is_refused_for_a_tenant_and_never_prices_its_usage() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let rates = [("gpt-4.1-mini", pb::TokenClass::Input, "0.40", "0.30")];
    let dollar_book = unique("book").to_lowercase();
    api.version(&dollar_book, "USD", hour(48), &rates).await;

    let refused = api
        .admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                tenant_id: unique("t"),
                name: "euro".into(),
                currency: "EUR".into(),
                price_book_id: dollar_book.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("a EUR tenant on a USD book");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("tenant.price_book_id:") && refused.message().contains("USD"),
        "{}",
        refused.message()
    );

    // A book that had no version when the tenant was made, and is then priced in dollars:
    // the tenant's usage is unpriced, not billed as euros at dollar prices.
    let later_book = unique("book").to_lowercase();
    let tenant = api.tenant("EUR", "UTC", Some(&later_book)).await;
    api.version(&later_book, "USD", hour(48), &rates).await;
    let response = api.ingest(vec![event(&tenant, "e", 1_000_000, 0)]).await;

    assert_eq!(statuses(&response), vec![Accepted]);
    assert!(response.results[0].unpriced);
    let row = &api.usage(&tenant, &[]).await[0];
    assert_eq!(row.currency, "EUR");
    assert_eq!(row.unpriced_tokens, 1_000_000);
    assert_eq!(dec(&row.billed_amount), Decimal::ZERO);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_unknown_model_is_stored_counted_and_surfaced_as_unpriced() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let book = unique("book").to_lowercase();
    api.version(
        &book,
        "USD",
        hour(48),
        &[("gpt-4.1-mini", pb::TokenClass::Input, "0.40", "0.30")],
    )
    .await;
    let tenant = api.tenant("USD", "UTC", Some(&book)).await;
    let mut unknown = event(&tenant, "unknown", 1_000, 100);
    unknown.model = "gpt-99".into();

    let response = api
        .ingest(vec![unknown, event(&tenant, "known", 1_000_000, 0)])
        .await;

    assert_eq!(statuses(&response), vec![Accepted, Accepted]);
    assert!(response.results[0].unpriced);
    assert!(!response.results[1].unpriced);
    let rows = api.usage(&tenant, &[pb::UsageDimension::Model]).await;
    let unknown_row = rows
        .iter()
        .find(|r| r.model.as_deref() == Some("gpt-99"))
        .expect("row");
    assert_eq!(unknown_row.total_tokens, 1_100);
    assert_eq!(unknown_row.unpriced_event_count, 1);
    assert_eq!(unknown_row.unpriced_tokens, 1_100);
    assert_eq!(dec(&unknown_row.billed_amount), Decimal::ZERO);
    let known_row = rows
        .iter()
        .find(|r| r.model.as_deref() == Some("gpt-4.1-mini"))
        .expect("row");
    assert_eq!(dec(&known_row.billed_amount), dec("0.40"));
    assert_eq!(known_row.unpriced_event_count, 0);

    let metrics = app.metrics().await;
    assert_eq!(
        crate::helpers::sample(
            &metrics,
            "tokenmeter_ingest_events_total",
            &[r#"outcome="unpriced""#, r#"channel="grpc""#]
        ),
        Some(1.0),
        "{metrics}"
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn usage_groups_by_class_and_by_local_day_of_the_tenant() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let tenant = api.tenant("USD", "Asia/Tokyo", None).await;
    // Two events straddling 00:00 in Tokyo (15:00 UTC).
    let tokyo_midnight = {
        let now = chrono::Utc::now() - Duration::days(2);
        let date = now.date_naive();
        date.and_hms_opt(15, 0, 0).expect("time").and_utc()
    };
    let mut late = event(&tenant, "late", 10, 1);
    late.occurred_at = Some(ts(tokyo_midnight - Duration::minutes(1)));
    let mut early = event(&tenant, "early", 20, 2);
    early.occurred_at = Some(ts(tokyo_midnight + Duration::minutes(1)));
    api.ingest(vec![late, early]).await;

    // Both events, whatever the time of day the test runs at (a range relative to now would
    // leave them out from 15:00 UTC on).
    let around_midnight = pb::TimeRange {
        start: Some(ts(tokyo_midnight - Duration::hours(24))),
        end: Some(ts(tokyo_midnight + Duration::hours(24))),
    };
    let days = api
        .query(pb::QueryUsageRequest {
            tenant_ids: vec![tenant.clone()],
            time_range: Some(around_midnight),
            window: pb::TimeBucket::Day as i32,
            ..Default::default()
        })
        .await;
    let by_class = api
        .query(pb::QueryUsageRequest {
            tenant_ids: vec![tenant.clone()],
            time_range: Some(around_midnight),
            group_by: vec![pb::UsageDimension::TokenClass as i32],
            ..Default::default()
        })
        .await;

    assert_eq!(days.len(), 2, "{days:?}");
    assert_eq!(days[0].bucket_end, Some(ts(tokyo_midnight)));
    assert_eq!(days[0].total_tokens, 11);
    assert_eq!(days[1].bucket_start, Some(ts(tokyo_midnight)));
    assert_eq!(days[1].total_tokens, 22);
    let classes: Vec<(Option<i32>, i64, i64)> = by_class
        .iter()
        .map(|r| (r.token_class, r.total_tokens, r.event_count))
        .collect();
    assert_eq!(
        classes,
        vec![
            (Some(pb::TokenClass::Input as i32), 30, 2),
            (Some(pb::TokenClass::Output as i32), 3, 2),
        ]
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn provider_usage_objects_are_normalized_before_deduplication() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let tenant = unique("t");
    // Anthropic: cache reads and writes are outside input_tokens.
    let mut anthropic = event(&tenant, "a1", 0, 0);
    anthropic.usage = Some(pb::usage_event::Usage::Anthropic(pb::AnthropicUsage {
        input_tokens: 50,
        output_tokens: 400,
        cache_read_input_tokens: 2_000,
        cache_creation_input_tokens: 300,
        ..Default::default()
    }));
    // The same call resent as disjoint buckets is the same payload: a duplicate, not a conflict.
    let mut as_buckets = event(&tenant, "a1", 0, 0);
    as_buckets.usage = Some(pb::usage_event::Usage::Tokens(pb::TokenCounts {
        input: 50,
        cache_read: 2_000,
        cache_write_5m: 300,
        output: 400,
        ..Default::default()
    }));

    let response = api.ingest(vec![anthropic, as_buckets]).await;

    assert_eq!(statuses(&response), vec![Accepted, Duplicate]);
    let tokens = api.usage(&tenant, &[]).await[0].tokens.expect("tokens");
    assert_eq!(
        (
            tokens.input,
            tokens.cache_read,
            tokens.cache_write_5m,
            tokens.output
        ),
        (50, 2_000, 300, 400)
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn retention_drops_whole_expired_months_with_their_dedup_keys() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let tenant = unique("t");
    let mut old = event(&tenant, "old", 5, 5);
    old.occurred_at = Some(ts(hour(24 * 70)));
    let recent = event(&tenant, "recent", 7, 7);
    api.ingest(vec![old.clone(), recent.clone()]).await;
    // The start of the month `recent` falls in.
    let this_month = {
        use chrono::Datelike;
        let now = hour(1);
        chrono::NaiveDate::from_ymd_opt(now.year(), now.month(), 1)
            .expect("date")
            .and_hms_opt(0, 0, 0)
            .expect("time")
            .and_utc()
    };

    // Right after the ack: the batch may still be queued, and retention folds it first.
    let report = tokenmeter::store::retention::apply(&app.pool, this_month, 1_000_000)
        .await
        .expect("retention");

    assert!(!report.dropped_partitions.is_empty());
    assert_eq!(report.deleted_keys, 1);
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM usage_events WHERE tenant_id = $1")
            .bind(&tenant)
            .fetch_all(&app.pool)
            .await
            .expect("ids");
    assert_eq!(ids, vec!["recent".to_owned()]);
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM usage_event_keys WHERE tenant_id = $1")
            .bind(&tenant)
            .fetch_all(&app.pool)
            .await
            .expect("keys");
    assert_eq!(keys, vec!["recent".to_owned()]);
    // The rollups keep both events: the dropped one was folded before its partition went.
    let rolled_up: i64 =
        sqlx::query_scalar("SELECT sum(events)::int8 FROM usage_rollups WHERE tenant_id = $1")
            .bind(&tenant)
            .fetch_one(&app.pool)
            .await
            .expect("rollups");
    assert_eq!(rolled_up, 2);
    // What is retained is still deduplicated.
    assert_eq!(statuses(&api.ingest(vec![recent]).await), vec![Duplicate]);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn validate_usage_answers_like_ingest_would_and_writes_nothing() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let book = unique("book").to_lowercase();
    api.version(
        &book,
        "USD",
        hour(48),
        &[
            ("gpt-4.1-mini", pb::TokenClass::Input, "0.40", "0.30"),
            ("gpt-4.1-mini", pb::TokenClass::Output, "1.60", "1.20"),
        ],
    )
    .await;
    let tenant = api.tenant("USD", "UTC", Some(&book)).await;
    api.ingest(vec![event(&tenant, "stored", 100, 10)]).await;
    let mut invalid = event(&tenant, "bad", 1, 1);
    invalid.provider = "OpenAI".into();

    let response = api
        .usage
        .validate_usage(pb::ValidateUsageRequest {
            events: vec![
                event(&tenant, "stored", 100, 10),
                event(&tenant, "stored", 999, 10),
                event(&tenant, "new", 2_000_000, 500_000),
                invalid,
            ],
        })
        .await
        .expect("validate")
        .into_inner();

    let statuses: Vec<pb::IngestStatus> = response
        .results
        .iter()
        .map(|r| r.result.as_ref().expect("result").status())
        .collect();
    assert_eq!(statuses, vec![Duplicate, Conflict, Accepted, Invalid]);
    let new = &response.results[2];
    // 2M × 0.40 + 0.5M × 1.60 = 0.80 + 0.80 = 1.60 ; cost 2M × 0.30 + 0.5M × 1.20 = 0.60 + 0.60
    assert_eq!(new.billed_amount.as_deref().map(dec), Some(dec("1.60")));
    assert_eq!(new.cost_amount.as_deref().map(dec), Some(dec("1.20")));
    assert_eq!(
        new.normalized_tokens.map(|t| (t.input, t.output)),
        Some((2_000_000, 500_000))
    );
    assert_eq!(
        response.results[3].result.as_ref().expect("result").field,
        "provider"
    );
    let (events, conflicts): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_events WHERE tenant_id = $1),
                (SELECT count(*) FROM usage_event_conflicts WHERE tenant_id = $1)",
    )
    .bind(&tenant)
    .fetch_one(&app.pool)
    .await
    .expect("counts");
    assert_eq!((events, conflicts), (1, 0), "a dry run writes nothing");
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn update_tenant_changes_only_the_masked_settings_and_guards_what_history_depends_on() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let mut quota = crate::quota::quota_client(app.channel().await);
    let tenant = api.tenant("USD", "UTC", None).await;
    let update = |given: pb::Tenant, paths: &[&str]| pb::UpdateTenantRequest {
        tenant: Some(given),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    };
    let given = pb::Tenant {
        tenant_id: tenant.clone(),
        name: "Acme GmbH".into(),
        currency: "EUR".into(),
        billing_timezone: "Europe/Berlin".into(),
        labels: [("tier".to_owned(), "gold".to_owned())].into(),
        status: pb::TenantStatus::Suspended as i32,
        ..Default::default()
    };

    // Only name and labels are masked: currency, zone and status stay as they were.
    let renamed = api
        .admin
        .update_tenant(update(given.clone(), &["name", "labels"]))
        .await
        .expect("update")
        .into_inner()
        .tenant
        .expect("tenant");
    assert_eq!(renamed.name, "Acme GmbH");
    assert_eq!(renamed.labels.get("tier").map(String::as_str), Some("gold"));
    assert_eq!(
        (renamed.currency.as_str(), renamed.billing_timezone.as_str()),
        ("USD", "UTC")
    );
    assert_eq!(renamed.status(), pb::TenantStatus::Active);
    let instant = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| (t.seconds, t.nanos));
    assert!(instant(&renamed.updated_at) > instant(&renamed.created_at));

    let unknown = api
        .admin
        .update_tenant(update(given.clone(), &["tenant_id"]))
        .await
        .expect_err("tenant_id is not updatable");
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert!(unknown.message().starts_with("update_mask:"));

    // With no history yet, the calendar may still change; once usage exists it may not.
    let rezoned = api
        .admin
        .update_tenant(update(given.clone(), &["billing_timezone"]))
        .await
        .expect("rezone")
        .into_inner()
        .tenant
        .expect("tenant");
    assert_eq!(rezoned.billing_timezone, "Europe/Berlin");
    api.ingest(vec![event(&tenant, "e", 10, 1)]).await;
    for path in ["currency", "billing_anchor_day"] {
        let mut change = given.clone();
        change.billing_anchor_day = 15;
        let refused = api
            .admin
            .update_tenant(update(change, &[path]))
            .await
            .expect_err("history pins the currency and calendar");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{path}");
        assert!(refused.message().starts_with(&format!("tenant.{path}:")));
    }

    // Suspending takes effect: Reserve denies the tenant.
    api.admin
        .update_tenant(update(given.clone(), &["status"]))
        .await
        .expect("suspend");
    let denied =
        crate::quota::reserve(&mut quota, crate::quota::reserve_request(&tenant, 10)).await;
    assert_eq!(denied.decision(), pb::QuotaDecision::Deny);
    assert_eq!(
        denied.denial.expect("denial").reason(),
        pb::QuotaDenialReason::TenantSuspended
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_value_postgres_cannot_store_is_an_invalid_argument_not_a_retry() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);

    let refused = api
        .admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                tenant_id: unique("t"),
                name: "Acme\0".into(),
                currency: "USD".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("a NUL in text");

    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("cannot be stored"),
        "{}",
        refused.message()
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn list_tenants_filters_by_status_before_paging() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    for (id, status) in [
        ("t-a", pb::TenantStatus::Active),
        ("t-b", pb::TenantStatus::Suspended),
        ("t-c", pb::TenantStatus::Active),
        ("t-d", pb::TenantStatus::Suspended),
    ] {
        api.admin
            .create_tenant(pb::CreateTenantRequest {
                tenant: Some(pb::Tenant {
                    tenant_id: id.into(),
                    name: id.into(),
                    currency: "USD".into(),
                    status: status as i32,
                    ..Default::default()
                }),
            })
            .await
            .expect("create tenant");
    }

    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = api
            .admin
            .list_tenants(pb::ListTenantsRequest {
                statuses: vec![pb::TenantStatus::Active as i32],
                page_size: 1,
                page_token: token.clone(),
            })
            .await
            .expect("list")
            .into_inner();
        pages.push(
            page.tenants
                .iter()
                .map(|t| t.tenant_id.clone())
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }

    let non_empty: Vec<Vec<String>> = pages.into_iter().filter(|p| !p.is_empty()).collect();
    assert_eq!(
        non_empty,
        vec![vec!["t-a".to_owned()], vec!["t-c".to_owned()]]
    );
    app.stop().await.expect("clean shutdown");
}

/// A transaction holding `table` in EXCLUSIVE mode: writes to it wait until it ends.
pub async fn stall_writes(
    pool: &PgPool,
    table: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut stall = pool.begin().await.expect("begin");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {table} IN EXCLUSIVE MODE"
    )))
    .execute(&mut *stall)
    .await
    .expect("lock the table");
    stall
}

/// Polls until `n` backends of the test database wait for a lock (or fails after 10 s).
pub async fn until_lock_waiters(pool: &PgPool, n: i64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity");
        if waiting >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} never waited");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A dollar and a euro price book for `gpt-4.1-mini` input: 0.40 USD and 0.50 EUR per million.
async fn dollar_and_euro_books(api: &mut Clients) -> (String, String) {
    let dollar_book = unique("book").to_lowercase();
    let euro_book = unique("book").to_lowercase();
    api.version(
        &dollar_book,
        "USD",
        hour(48),
        &[("gpt-4.1-mini", pb::TokenClass::Input, "0.40", "0.30")],
    )
    .await;
    api.version(
        &euro_book,
        "EUR",
        hour(48),
        &[("gpt-4.1-mini", pb::TokenClass::Input, "0.50", "0.35")],
    )
    .await;
    (dollar_book, euro_book)
}

/// A currency change commits after a batch of a new dollar tenant priced its events but
/// before it wrote them: the batch waits for it, then must be repriced in euros. `watcher`
/// holds the change (standing in for UpdateTenant, which holds the tenant row the same way)
/// and watches the batch wait.
async fn a_batch_waits_for_a_currency_change_and_is_repriced(
    app: &TestApp,
    watcher: &PgPool,
    api: &mut Clients,
    dollar_book: &str,
    euro_book: &str,
) {
    let repriced = api.tenant("USD", "UTC", Some(dollar_book)).await;
    let mut change = watcher.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM tenants WHERE tenant_id = $1 FOR UPDATE")
        .bind(&repriced)
        .execute(&mut *change)
        .await
        .expect("hold the tenant row");
    let mut other = Clients::new(app.channel().await);
    let batch = {
        let tenant = repriced.clone();
        tokio::spawn(async move { other.ingest(vec![event(&tenant, "e", 1_000_000, 0)]).await })
    };
    until_lock_waiters(watcher, 1, "the batch").await;
    sqlx::query("UPDATE tenants SET currency = 'EUR', price_book_id = $2 WHERE tenant_id = $1")
        .bind(&repriced)
        .bind(euro_book)
        .execute(&mut *change)
        .await
        .expect("change the currency");
    change.commit().await.expect("commit the change");
    assert_eq!(statuses(&batch.await.expect("batch")), vec![Accepted]);
    let row = &api.usage(&repriced, &[]).await[0];
    assert_eq!(row.currency, "EUR");
    // 1,000,000 input tokens at 0.50 EUR per million.
    assert_eq!(dec(&row.billed_amount), dec("0.50"));
}

#[tokio::test]
async fn a_currency_change_racing_a_tenants_first_batch_never_leaves_usage_in_the_old_currency() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let (dollar_book, euro_book) = dollar_and_euro_books(&mut api).await;
    let to_euros = |tenant: &str| pb::UpdateTenantRequest {
        tenant: Some(pb::Tenant {
            tenant_id: tenant.to_owned(),
            currency: "EUR".into(),
            price_book_id: euro_book.clone(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["currency".into(), "price_book_id".into()],
        }),
    };

    a_batch_waits_for_a_currency_change_and_is_repriced(
        &app,
        &app.pool,
        &mut api,
        &dollar_book,
        &euro_book,
    )
    .await;

    // UpdateTenant arrives while the first batch is being written (held at its raw rows, with
    // nothing queued for the folder, whose locks would count as waiters): it waits for the
    // batch, then finds its usage and refuses.
    let kept = api.tenant("USD", "UTC", Some(&dollar_book)).await;
    folded(&app.pool).await;
    let stall = stall_writes(&app.pool, "usage_events").await;
    let mut other = Clients::new(app.channel().await);
    let batch = {
        let tenant = kept.clone();
        tokio::spawn(async move { other.ingest(vec![event(&tenant, "e", 1_000_000, 0)]).await })
    };
    until_lock_waiters(&app.pool, 1, "the batch").await;
    let mut admin = api.admin.clone();
    let update = {
        let request = to_euros(&kept);
        tokio::spawn(async move { admin.update_tenant(request).await })
    };
    until_lock_waiters(&app.pool, 2, "UpdateTenant").await;
    stall.commit().await.expect("release the raw rows");
    assert_eq!(statuses(&batch.await.expect("batch")), vec![Accepted]);
    let refused = update
        .await
        .expect("update task")
        .expect_err("usage exists by the time the update reads history");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().starts_with("tenant.currency:"),
        "{}",
        refused.message()
    );
    let row = &api.usage(&kept, &[]).await[0];
    assert_eq!(row.currency, "USD");
    // 1,000,000 input tokens at 0.40 USD per million.
    assert_eq!(dec(&row.billed_amount), dec("0.40"));
    app.stop().await.expect("clean shutdown");
}

/// Repricing reads the new catalog after the batch has given its connection back: a server
/// with a single database connection still reprices instead of waiting for a second one.
#[tokio::test]
async fn a_batch_repriced_after_a_currency_change_needs_no_second_connection() {
    let app = spawn_app_with(|settings| settings.database.max_connections = 1).await;
    let watcher = PgPool::connect_with((*app.pool.connect_options()).clone())
        .await
        .expect("a pool of the test's own");
    let mut api = Clients::new(app.channel().await);
    let (dollar_book, euro_book) = dollar_and_euro_books(&mut api).await;
    a_batch_waits_for_a_currency_change_and_is_repriced(
        &app,
        &watcher,
        &mut api,
        &dollar_book,
        &euro_book,
    )
    .await;
    app.stop().await.expect("clean shutdown");
}
