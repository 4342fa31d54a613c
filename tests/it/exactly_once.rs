//! Property: any permutation and any duplication of the same multiset of events, split into
//! any batches, yields identical rollups and identical usage-query answers.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokenmeter::proto::v1 as pb;

use crate::helpers::{assert_rollups_equal_raw, spawn_app};
use crate::usage_support::{Clients, event, unique};

/// One distinct event of a case: (agent, model, input, output, reasoning, hours back).
type Spec = (u8, u8, i64, i64, i64, i64);

fn distinct_events() -> impl Strategy<Value = Vec<Spec>> {
    prop::collection::vec(
        (0u8..3, 0u8..2, 0i64..5_000, 0i64..2_000, 0i64..500, 1i64..4),
        1..40,
    )
}

/// A delivery plan: each distinct event sent 1-3 times, in a shuffled order, cut into batches.
fn plan() -> impl Strategy<Value = (Vec<Spec>, Vec<usize>, Vec<usize>)> {
    distinct_events().prop_flat_map(|events| {
        let n = events.len();
        let copies = prop::collection::vec(1usize..=3, n);
        (Just(events), copies).prop_flat_map(|(events, copies)| {
            let deliveries: Vec<usize> = copies
                .iter()
                .enumerate()
                .flat_map(|(i, c)| std::iter::repeat_n(i, *c))
                .collect();
            let total = deliveries.len();
            (
                Just(events),
                Just(deliveries).prop_shuffle(),
                prop::collection::vec(1usize..=total.max(1), 1..6),
            )
        })
    })
}

fn build(tenant: &str, index: usize, spec: &Spec) -> pb::UsageEvent {
    let (agent, model, input, output, reasoning, hours) = *spec;
    let mut e = event(tenant, &format!("e{index}"), input, output);
    e.agent_id = format!("agent-{agent}");
    e.model = ["gpt-4.1-mini", "gpt-99-unpriced"][usize::from(model)].to_owned();
    if let Some(pb::usage_event::Usage::Tokens(tokens)) = e.usage.as_mut() {
        tokens.reasoning = reasoning;
    }
    e.occurred_at = Some(crate::usage_support::ts(
        crate::usage_support::hour(hours) + chrono::Duration::minutes(i64::from(agent) * 7),
    ));
    e
}

/// Everything a query can tell about a tenant, in a comparable form.
async fn answers(api: &mut Clients, tenant: &str) -> Vec<String> {
    let mut out = Vec::new();
    for group_by in [
        vec![],
        vec![pb::UsageDimension::Agent, pb::UsageDimension::Model],
        vec![pb::UsageDimension::TokenClass],
    ] {
        for window in [pb::TimeBucket::None, pb::TimeBucket::Hour] {
            let rows = api
                .query(pb::QueryUsageRequest {
                    tenant_ids: vec![tenant.to_owned()],
                    time_range: Some(pb::TimeRange {
                        start: Some(crate::usage_support::ts(crate::usage_support::hour(48))),
                        end: Some(crate::usage_support::ts(crate::usage_support::hour(-1))),
                    }),
                    window: window as i32,
                    group_by: group_by.iter().map(|d| *d as i32).collect(),
                    ..Default::default()
                })
                .await;
            out.extend(rows.into_iter().map(|mut r| {
                // Normalize decimal scale so equal amounts compare equal.
                r.billed_amount = r
                    .billed_amount
                    .parse::<rust_decimal::Decimal>()
                    .expect("d")
                    .normalize()
                    .to_string();
                r.cost_amount = r
                    .cost_amount
                    .parse::<rust_decimal::Decimal>()
                    .expect("d")
                    .normalize()
                    .to_string();
                format!("{r:?}")
            }));
        }
    }
    out
}

#[test]
fn any_order_duplication_and_batching_of_the_same_events_gives_the_same_answers() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (app, channel, book) = runtime.block_on(async {
        let app = spawn_app().await;
        let channel = app.channel().await;
        let mut api = Clients::new(channel.clone());
        let book = unique("book").to_lowercase();
        api.version(
            &book,
            "USD",
            crate::usage_support::hour(72),
            &[
                ("gpt-4.1-mini", pb::TokenClass::Input, "0.40", "0.30"),
                ("gpt-4.1-mini", pb::TokenClass::Output, "1.60", "1.20"),
            ],
        )
        .await;
        (app, channel, book)
    });

    let mut runner = TestRunner::new(Config {
        cases: 24,
        ..Config::default()
    });
    runner
        .run(&plan(), |(events, deliveries, cuts)| {
            runtime.block_on(async {
                let mut api = Clients::new(channel.clone());
                // Reference: each distinct event once, one batch, in order.
                let reference = api.tenant("USD", "UTC", Some(&book)).await;
                let once: Vec<pb::UsageEvent> = events
                    .iter()
                    .enumerate()
                    .map(|(i, e)| build(&reference, i, e))
                    .collect();
                api.ingest(once).await;

                // Subject: shuffled deliveries with duplicates, cut into batches.
                let subject = api.tenant("USD", "UTC", Some(&book)).await;
                let sends: Vec<pb::UsageEvent> = deliveries
                    .iter()
                    .map(|i| build(&subject, *i, &events[*i]))
                    .collect();
                let mut accepted = 0;
                let mut rest = sends.as_slice();
                let mut sizes = cuts.iter().cycle();
                while !rest.is_empty() {
                    let size = (*sizes.next().expect("cycle")).min(rest.len());
                    let (batch, tail) = rest.split_at(size);
                    accepted += api
                        .ingest(batch.to_vec())
                        .await
                        .summary
                        .expect("summary")
                        .accepted;
                    rest = tail;
                }

                prop_assert_eq!(accepted, i64::try_from(events.len()).expect("len"));
                let strip = |rows: Vec<String>, tenant: &str| -> Vec<String> {
                    rows.into_iter().map(|r| r.replace(tenant, "T")).collect()
                };
                prop_assert_eq!(
                    strip(answers(&mut api, &reference).await, &reference),
                    strip(answers(&mut api, &subject).await, &subject)
                );
                // And the rollups those answers come from equal the raw rows once folded.
                assert_rollups_equal_raw(&app.pool).await;
                Ok(())
            })
        })
        .expect("property holds");
    runtime.block_on(app.stop()).expect("clean shutdown");
}
