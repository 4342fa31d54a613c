//! GetAttribution against a hand-computed scenario: refunds, a failure, a reversal,
//! unattributed usage and two currencies, every figure written out.

use rust_decimal::{Decimal, dec};
use tokenmeter::proto::v1 as pb;

use crate::helpers::spawn_app;
use crate::transactions::{completed_in, lifecycle_of, started};
use crate::usage_support::{Clients, event, hour, ts, unique};

fn usage(
    tenant: &str,
    id: &str,
    transaction: Option<&str>,
    input: i64,
    output: i64,
) -> pb::UsageEvent {
    pb::UsageEvent {
        transaction_id: transaction.map(str::to_owned),
        ..event(tenant, id, input, output)
    }
}

fn decimal(text: &str) -> Decimal {
    text.parse().expect("decimal string")
}

fn optional(text: &Option<String>) -> Option<Decimal> {
    text.as_deref().map(decimal)
}

#[tokio::test]
async fn every_attribution_figure_matches_the_hand_computed_scenario() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    // USD rates per 1M tokens: input 2.00 (cost 1.50), output 8.00 (cost 6.00).
    let usd_book = unique("usd");
    api.version(
        &usd_book,
        "USD",
        hour(72),
        &[
            ("gpt-4.1-mini", pb::TokenClass::Input, "2.00", "1.50"),
            ("gpt-4.1-mini", pb::TokenClass::Output, "8.00", "6.00"),
        ],
    )
    .await;
    // EUR rates: input 1.00 (cost 0.50), output 4.00 (cost 2.00).
    let eur_book = unique("eur");
    api.version(
        &eur_book,
        "EUR",
        hour(72),
        &[
            ("gpt-4.1-mini", pb::TokenClass::Input, "1.00", "0.50"),
            ("gpt-4.1-mini", pb::TokenClass::Output, "4.00", "2.00"),
        ],
    )
    .await;
    let a = api.tenant("USD", "UTC", Some(&usd_book)).await;
    let b = api.tenant("EUR", "UTC", Some(&eur_book)).await;

    // Usage first (before its transactions exist), then lifecycle, then more usage.
    api.ingest(vec![
        usage(&a, "u1", Some("o1"), 100_000, 10_000),
        usage(&a, "u3", None, 20_000, 0),
        usage(&b, "u4", Some("o4"), 200_000, 20_000),
    ])
    .await;
    let kind = pb::transaction_event::Kind::Refunded(pb::TransactionRefunded {
        amount: Some(pb::Money {
            amount: "5.00".into(),
            currency: "USD".into(),
        }),
        reason: "cold food".into(),
    });
    let results = api
        .transactions
        .record_transaction_events(pb::RecordTransactionEventsRequest {
            events: vec![
                started(&a, "o1", "a1"),
                completed_in(&a, "o1", "a2", "30.00", "USD"),
                lifecycle_of(&a, "o1", "a3", 40, kind),
                started(&a, "o2", "a4"),
                lifecycle_of(
                    &a,
                    "o2",
                    "a5",
                    30,
                    pb::transaction_event::Kind::Failed(pb::TransactionFailed {
                        reason: "no courier".into(),
                    }),
                ),
                completed_in(&a, "o3", "a6", "12.00", "EUR"),
                started(&b, "o4", "b1"),
                completed_in(&b, "o4", "b2", "50.00", "EUR"),
                lifecycle_of(
                    &b,
                    "o4",
                    "b3",
                    50,
                    pb::transaction_event::Kind::Reversed(pb::TransactionReversed {
                        reason: "chargeback".into(),
                    }),
                ),
            ],
            omit_accepted_results: false,
        })
        .await
        .expect("record")
        .into_inner();
    assert_eq!(results.summary.expect("summary").accepted, 9);
    api.ingest(vec![usage(&a, "u2", Some("o2"), 50_000, 5_000)])
        .await;

    let response = api
        .reports
        .get_attribution(pb::GetAttributionRequest {
            tenant_ids: vec![a.clone(), b.clone()],
            time_range: Some(pb::TimeRange {
                start: Some(ts(hour(48))),
                end: Some(ts(hour(-1))),
            }),
            group_by: vec![pb::AttributionDimension::Tenant as i32],
            ..Default::default()
        })
        .await
        .expect("attribution")
        .into_inner();
    let row = |tenant: &str, currency: &str| {
        response
            .rows
            .iter()
            .find(|r| r.tenant_id.as_deref() == Some(tenant) && r.currency == currency)
            .unwrap_or_else(|| panic!("no row {tenant} {currency}: {:?}", response.rows))
            .clone()
    };
    assert_eq!(response.rows.len(), 3, "{:?}", response.rows);

    // Tenant a, USD: o1 completed 30.00 and refunded 5.00; o2 failed; u3 unattributed.
    let usd = row(&a, "USD");
    assert_eq!(
        (
            usd.transactions_started,
            usd.transactions_completed,
            usd.transactions_failed,
            usd.transactions_refunded,
            usd.transactions_reversed
        ),
        (2, 1, 1, 1, 0)
    );
    assert_eq!(decimal(&usd.revenue), dec!(30.00));
    assert_eq!(decimal(&usd.refunds), dec!(5.00));
    assert_eq!(decimal(&usd.net_revenue), dec!(25.00));
    let tokens = usd.tokens.expect("tokens");
    // input 100,000 + 20,000 + 50,000; output 10,000 + 5,000
    assert_eq!(
        (tokens.input, tokens.output, usd.total_tokens),
        (170_000, 15_000, 185_000)
    );
    // u1: 0.20 + 0.08 = 0.28; u2: 0.10 + 0.04 = 0.14; u3: 0.04 → 0.46
    assert_eq!(decimal(&usd.spend), dec!(0.46));
    // u1: 0.15 + 0.06 = 0.21; u2: 0.075 + 0.03 = 0.105; u3: 0.03 → 0.345
    assert_eq!(decimal(&usd.cost), dec!(0.345));
    assert_eq!(usd.usage_event_count, 3);
    assert_eq!(decimal(&usd.failed_spend), dec!(0.14));
    assert_eq!(decimal(&usd.refunded_spend), dec!(0.28));
    assert_eq!(decimal(&usd.unattributed_spend), dec!(0.04));
    assert_eq!(usd.unattributed_tokens, 20_000);
    // 0.46 ÷ 25.00 = 0.0184; 0.345 ÷ 25.00 = 0.0138
    assert_eq!(optional(&usd.spend_to_revenue), Some(dec!(0.0184)));
    assert_eq!(optional(&usd.cost_to_revenue), Some(dec!(0.0138)));
    // 25.00 − 0.46; 0.46 − 0.345
    assert_eq!(decimal(&usd.gross_margin), dec!(24.54));
    assert_eq!(decimal(&usd.token_margin), dec!(0.115));
    assert_eq!(
        optional(&usd.tokens_per_completed_transaction),
        Some(dec!(185000))
    );
    assert_eq!(
        optional(&usd.spend_per_completed_transaction),
        Some(dec!(0.46))
    );
    assert_eq!(
        optional(&usd.cost_per_completed_transaction),
        Some(dec!(0.345))
    );
    // 25.00 × 1000 ÷ 185,000 = 0.1351351… → 0.135135
    assert_eq!(optional(&usd.revenue_per_1k_tokens), Some(dec!(0.135135)));

    // Tenant a, EUR: o3 completed for 12.00 EUR, no tokens: never mixed into USD.
    let eur_a = row(&a, "EUR");
    assert_eq!(eur_a.transactions_completed, 1);
    assert_eq!(decimal(&eur_a.net_revenue), dec!(12.00));
    assert_eq!(decimal(&eur_a.spend), Decimal::ZERO);
    assert_eq!(optional(&eur_a.spend_to_revenue), Some(Decimal::ZERO));
    assert_eq!(eur_a.revenue_per_1k_tokens, None, "no tokens: unset");

    // Tenant b, EUR: o4 completed 50.00 then reversed whole.
    let eur_b = row(&b, "EUR");
    assert_eq!(
        (
            eur_b.transactions_started,
            eur_b.transactions_completed,
            eur_b.transactions_reversed
        ),
        (1, 1, 1)
    );
    assert_eq!(decimal(&eur_b.revenue), dec!(50.00));
    assert_eq!(decimal(&eur_b.refunds), dec!(50.00));
    assert_eq!(decimal(&eur_b.net_revenue), Decimal::ZERO);
    // 200,000 × 1.00/1M + 20,000 × 4.00/1M = 0.20 + 0.08
    assert_eq!(decimal(&eur_b.spend), dec!(0.28));
    // 0.10 + 0.04
    assert_eq!(decimal(&eur_b.cost), dec!(0.14));
    assert_eq!(decimal(&eur_b.refunded_spend), dec!(0.28));
    assert_eq!(eur_b.spend_to_revenue, None, "net revenue 0: unset");
    assert_eq!(decimal(&eur_b.gross_margin), dec!(-0.28));
    assert_eq!(optional(&eur_b.revenue_per_1k_tokens), Some(Decimal::ZERO));

    let refused = api
        .reports
        .get_attribution(pb::GetAttributionRequest {
            tenant_ids: vec![a.clone()],
            time_range: Some(pb::TimeRange {
                start: Some(ts(hour(48))),
                end: Some(ts(hour(-1))),
            }),
            reporting_currency: "USD".into(),
            ..Default::default()
        })
        .await
        .expect_err("no FX table");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    app.stop().await.expect("clean stop");
}

/// The figures a row adds up, to compare rows of different groupings.
fn totals(row: &pb::AttributionRow) -> (i64, i64, i64, i64, Decimal, Decimal, Decimal, Decimal) {
    (
        row.transactions_started,
        row.transactions_completed,
        row.transactions_failed,
        row.transactions_refunded,
        decimal(&row.revenue),
        decimal(&row.refunds),
        decimal(&row.spend),
        decimal(&row.failed_spend) + decimal(&row.refunded_spend),
    )
}

#[tokio::test]
async fn rows_per_agent_and_per_model_add_up_to_the_tenant_total() {
    let app = spawn_app().await;
    let mut api = Clients::new(app.channel().await);
    let book = unique("usd");
    api.version(
        &book,
        "USD",
        hour(72),
        &[
            ("gpt-4.1-mini", pb::TokenClass::Input, "2.00", "1.50"),
            ("gpt-4.1-mini", pb::TokenClass::Output, "8.00", "6.00"),
            ("gpt-4.1", pb::TokenClass::Input, "4.00", "3.00"),
            ("gpt-4.1", pb::TokenClass::Output, "16.00", "12.00"),
        ],
    )
    .await;
    let a = api.tenant("USD", "UTC", Some(&book)).await;
    let on = |id: &str, transaction: &str, model: &str, input: i64| pb::UsageEvent {
        model: model.to_owned(),
        ..usage(&a, id, Some(transaction), input, 1_000)
    };
    // o1 on two models, completed 30.00 and refunded twice; o2 on one model, failed.
    api.ingest(vec![
        on("u1", "o1", "gpt-4.1-mini", 100_000),
        on("u2", "o1", "gpt-4.1", 50_000),
        on("u3", "o2", "gpt-4.1-mini", 10_000),
    ])
    .await;
    let refund = |id: &str, minutes: i64| {
        let kind = pb::transaction_event::Kind::Refunded(pb::TransactionRefunded {
            amount: Some(pb::Money {
                amount: "2.50".into(),
                currency: "USD".into(),
            }),
            reason: "late".into(),
        });
        lifecycle_of(&a, "o1", id, minutes, kind)
    };
    let failed = pb::transaction_event::Kind::Failed(pb::TransactionFailed {
        reason: "no courier".into(),
    });
    api.transactions
        .record_transaction_events(pb::RecordTransactionEventsRequest {
            events: vec![
                started(&a, "o1", "a1"),
                completed_in(&a, "o1", "a2", "30.00", "USD"),
                refund("a3", 40),
                refund("a4", 45),
                started(&a, "o2", "a5"),
                lifecycle_of(&a, "o2", "a6", 30, failed),
            ],
            omit_accepted_results: false,
        })
        .await
        .expect("record");

    let total = api.attribution(&a, &[]).await;
    let by_agent = api
        .attribution(&a, &[pb::AttributionDimension::Agent])
        .await;
    let by_model = api
        .attribution(&a, &[pb::AttributionDimension::Model])
        .await;

    // Two refund events of one transaction: one refunded transaction, 5.00 refunded.
    // Spend: o1 0.20 + 0.008 + 0.20 + 0.016; o2 0.02 + 0.008 → 0.452, of which o2's 0.028
    // failed and o1's 0.424 refunded.
    assert_eq!(total.len(), 1, "{total:?}");
    assert_eq!(
        totals(&total[0]),
        (
            2,
            1,
            1,
            1,
            dec!(30.00),
            dec!(5.00),
            dec!(0.452),
            dec!(0.452)
        )
    );
    assert_eq!(by_agent.len(), 1, "{by_agent:?}");
    assert_eq!(totals(&by_agent[0]), totals(&total[0]));
    // Per model, money adds up to the total; o1's counts appear on both of its models.
    assert_eq!(by_model.len(), 2, "{by_model:?}");
    let sum = |f: fn(&pb::AttributionRow) -> &String| -> Decimal {
        by_model.iter().map(|r| decimal(f(r))).sum()
    };
    assert_eq!(sum(|r| &r.revenue), dec!(30.00));
    assert_eq!(sum(|r| &r.refunds), dec!(5.00));
    assert_eq!(sum(|r| &r.spend), dec!(0.452));
    assert!(by_model.iter().all(|r| r.transactions_completed == 1));
    app.stop().await.expect("clean stop");
}
