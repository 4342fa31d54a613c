//! Billing against the real Postgres: invoices computed by hand (flat, tiered, discount, tax,
//! minor units), immutability enforced by the database, concurrent finalizers, late usage and
//! void.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Duration, Utc};
use rust_decimal::Decimal;
use tokenmeter::domain::period::{BillingCalendar, BillingPeriod};
use tokenmeter::proto::v1 as pb;
use tokenmeter::proto::v1::invoice_service_client::InvoiceServiceClient;
use tonic::Code;

use crate::helpers::{
    ADMIN_KEY, Authed, TestApp, authed, base_database_url, spawn_app_with, tokenmeter_command,
};
use crate::usage_support::{Clients, ts, unique};

fn dec(text: &str) -> Decimal {
    text.parse().expect("decimal")
}

/// A test server whose background close job is off, so only the test finalizes.
async fn app() -> TestApp {
    spawn_app_with(|s| s.billing.close_interval = std::time::Duration::ZERO).await
}

/// The UTC calendar month `months_ago` months before the current one.
pub fn month(months_ago: u32) -> BillingPeriod {
    let calendar = BillingCalendar::parse("UTC", 1).expect("calendar");
    let mut label = calendar.period_containing(Utc::now()).label;
    for _ in 0..months_ago {
        label = label.previous();
    }
    calendar.period(label)
}

struct Billing {
    api: Clients,
    invoices: InvoiceServiceClient<Authed>,
}

impl Billing {
    async fn new(app: &TestApp) -> Self {
        let channel = app.channel().await;
        Self {
            api: Clients::new(channel.clone()),
            invoices: InvoiceServiceClient::new(authed(channel, ADMIN_KEY)),
        }
    }

    /// A tenant priced with `book`, billed in `currency`, with optional tax and rounding.
    async fn tenant(
        &mut self,
        currency: &str,
        book: &str,
        tax: Option<&str>,
        rounding: pb::RoundingMode,
    ) -> String {
        let tenant_id = unique("t");
        self.api
            .admin
            .create_tenant(pb::CreateTenantRequest {
                tenant: Some(pb::Tenant {
                    tenant_id: tenant_id.clone(),
                    name: tenant_id.clone(),
                    currency: currency.to_owned(),
                    price_book_id: book.to_owned(),
                    tax_rate_percent: tax.map(str::to_owned),
                    rounding_mode: rounding as i32,
                    ..Default::default()
                }),
            })
            .await
            .expect("create tenant");
        tenant_id
    }

    /// A book whose rates (model, class, price or tiers) start well before the test months.
    async fn book(&mut self, currency: &str, rates: Vec<pb::Rate>) -> String {
        let book = unique("book");
        self.api
            .prices
            .create_price_book_version(pb::CreatePriceBookVersionRequest {
                version: Some(pb::PriceBookVersion {
                    price_book_id: book.clone(),
                    currency: currency.to_owned(),
                    effective_from: Some(ts(month(6).start)),
                    rates,
                    ..Default::default()
                }),
                allow_backdated: true,
            })
            .await
            .expect("create price book version");
        book
    }

    /// Ingests one event of `model` with these buckets at `at`.
    async fn usage(
        &mut self,
        tenant: &str,
        at: DateTime<Utc>,
        model: &str,
        tokens: pb::TokenCounts,
    ) {
        self.raw_usage(tenant, at, model, pb::usage_event::Usage::Tokens(tokens))
            .await;
    }

    /// A later version of `book` from `from`.
    async fn version(
        &mut self,
        book: &str,
        currency: &str,
        from: DateTime<Utc>,
        rates: Vec<pb::Rate>,
    ) {
        self.api
            .prices
            .create_price_book_version(pb::CreatePriceBookVersionRequest {
                version: Some(pb::PriceBookVersion {
                    price_book_id: book.to_owned(),
                    currency: currency.to_owned(),
                    effective_from: Some(ts(from)),
                    rates,
                    ..Default::default()
                }),
                allow_backdated: true,
            })
            .await
            .expect("create price book version");
    }

    /// Ingests one event of `model` carrying `usage` at `at`.
    async fn raw_usage(
        &mut self,
        tenant: &str,
        at: DateTime<Utc>,
        model: &str,
        usage: pb::usage_event::Usage,
    ) {
        let response = self
            .api
            .ingest(vec![pb::UsageEvent {
                event_id: unique("e"),
                source: "billing-test".into(),
                tenant_id: tenant.to_owned(),
                agent_id: "agent-1".into(),
                provider: "openai".into(),
                model: model.to_owned(),
                occurred_at: Some(ts(at)),
                usage: Some(usage),
                ..Default::default()
            }])
            .await;
        assert_eq!(
            response.results[0].status(),
            pb::IngestStatus::Accepted,
            "{:?}",
            response.results[0]
        );
    }

    /// A tenant billed 3.00 USD per million input tokens of model `m`, with 1,000,000 tokens in
    /// `earlier` and 200,000 in `later`.
    async fn two_months_at_three_dollars(
        &mut self,
        earlier: &BillingPeriod,
        later: &BillingPeriod,
    ) -> String {
        let book = self
            .book("USD", vec![flat("m", pb::TokenClass::Input, "3.00")])
            .await;
        let tenant = self
            .tenant("USD", &book, None, pb::RoundingMode::Unspecified)
            .await;
        self.usage(&tenant, day(earlier, 5, 5), "m", tokens(1_000_000, 0))
            .await;
        self.usage(&tenant, day(later, 5, 5), "m", tokens(200_000, 0))
            .await;
        tenant
    }

    async fn preview(&mut self, tenant: &str, period: &BillingPeriod) -> pb::Invoice {
        self.invoices
            .preview_invoice(pb::PreviewInvoiceRequest {
                tenant_id: tenant.to_owned(),
                period: period.label.to_string(),
                currency: String::new(),
            })
            .await
            .expect("preview")
            .into_inner()
            .invoices
            .pop()
            .expect("one invoice")
    }

    async fn finalize(&mut self, tenant: &str, invoice_id: &str) -> pb::Invoice {
        self.invoices
            .finalize_invoice(pb::FinalizeInvoiceRequest {
                tenant_id: tenant.to_owned(),
                invoice_id: invoice_id.to_owned(),
                ignore_grace_period: true,
            })
            .await
            .expect("finalize")
            .into_inner()
            .invoice
            .expect("invoice")
    }

    async fn close(&mut self, period: &BillingPeriod, tenants: &[&str]) -> pb::ClosePeriodResponse {
        self.invoices
            .close_period(pb::ClosePeriodRequest {
                period: period.label.to_string(),
                tenant_ids: tenants.iter().map(|t| (*t).to_owned()).collect(),
                ignore_grace_period: true,
                dry_run: false,
            })
            .await
            .expect("close period")
            .into_inner()
    }
}

fn flat(model: &str, class: pb::TokenClass, price: &str) -> pb::Rate {
    pb::Rate {
        provider: "openai".into(),
        model: model.into(),
        token_class: class as i32,
        price_per_million: price.into(),
        cost_per_million: "0".into(),
        ..Default::default()
    }
}

fn tokens(input: i64, output: i64) -> pb::TokenCounts {
    pb::TokenCounts {
        input,
        output,
        ..Default::default()
    }
}

/// (kind, precise, amount) of each line.
fn lines(invoice: &pb::Invoice) -> Vec<(pb::InvoiceLineKind, Decimal, Decimal)> {
    invoice
        .lines
        .iter()
        .map(|l| (l.kind(), dec(&l.precise_amount), dec(&l.amount)))
        .collect()
}

fn day(period: &BillingPeriod, days: i64, hours: i64) -> DateTime<Utc> {
    period.start + Duration::days(days) + Duration::hours(hours) + Duration::minutes(7)
}

#[tokio::test]
async fn a_finalized_invoice_bills_flat_rates_with_discount_and_tax_as_computed_by_hand() {
    let app = app().await;
    let mut billing = Billing::new(&app).await;
    let book = billing
        .book(
            "USD",
            vec![
                flat("gpt-4.1-mini", pb::TokenClass::Input, "0.40"),
                flat("gpt-4.1-mini", pb::TokenClass::Output, "1.60"),
            ],
        )
        .await;
    let tenant = billing
        .tenant("USD", &book, Some("19"), pb::RoundingMode::Unspecified)
        .await;
    billing
        .api
        .prices
        .create_tenant_price_override(pb::CreateTenantPriceOverrideRequest {
            override_rule: Some(pb::TenantPriceOverride {
                tenant_id: tenant.clone(),
                adjustment: Some(pb::tenant_price_override::Adjustment::DiscountPercent(
                    "10".into(),
                )),
                effective_from: Some(ts(month(6).start)),
                ..Default::default()
            }),
            allow_backdated: true,
        })
        .await
        .expect("discount");
    let last = month(1);
    // 1,234,567 input and 345,678 output tokens over three events on different days.
    billing
        .usage(
            &tenant,
            day(&last, 0, 3),
            "gpt-4.1-mini",
            tokens(1_000_000, 300_000),
        )
        .await;
    billing
        .usage(
            &tenant,
            day(&last, 9, 14),
            "gpt-4.1-mini",
            tokens(200_000, 45_000),
        )
        .await;
    billing
        .usage(
            &tenant,
            day(&last, 20, 23),
            "gpt-4.1-mini",
            tokens(34_567, 678),
        )
        .await;

    let draft = billing.preview(&tenant, &last).await;
    let invoice = billing.finalize(&tenant, &draft.invoice_id).await;

    // input:  1,234,567 × 0.40 / 1M = 0.4938268 → 0.49
    // output:   345,678 × 1.60 / 1M = 0.5530848 → 0.55          subtotal 0.49 + 0.55 = 1.04
    // discount: −10 % × (0.4938268 + 0.5530848 = 1.0469116) = −0.10469116 → −0.10
    // tax: 19 % × (1.04 − 0.10 = 0.94) = 0.1786 → 0.18
    // total: 1.04 − 0.10 + 0.18 = 1.12
    let expected = vec![
        (pb::InvoiceLineKind::Usage, dec("0.4938268"), dec("0.49")),
        (pb::InvoiceLineKind::Usage, dec("0.5530848"), dec("0.55")),
        (
            pb::InvoiceLineKind::Discount,
            dec("-0.10469116"),
            dec("-0.10"),
        ),
        (pb::InvoiceLineKind::Tax, dec("0.1786"), dec("0.18")),
    ];
    assert_eq!(lines(&draft), expected);
    assert_eq!(lines(&invoice), expected);
    assert_eq!(
        (
            dec(&invoice.subtotal),
            dec(&invoice.discount),
            dec(&invoice.tax),
            dec(&invoice.total)
        ),
        (dec("1.04"), dec("-0.10"), dec("0.18"), dec("1.12"))
    );
    assert_eq!(invoice.lines[0].quantity, 1_234_567);
    assert_eq!(invoice.lines[0].unit_price, "0.40");
    assert_eq!(invoice.state(), pb::InvoiceState::Finalized);
    assert_eq!(
        invoice.number.as_deref(),
        Some(format!("INV-{}-000001", Utc::now().format("%Y")).as_str())
    );
    assert_eq!(invoice.currency_exponent, 2);
    assert_eq!(invoice.rounding_mode(), pb::RoundingMode::HalfEven);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn graduated_and_volume_tiers_cross_their_boundaries_over_the_period() {
    let app = app().await;
    let mut billing = Billing::new(&app).await;
    let tier = |up_to: Option<i64>, price: &str| pb::PriceTier {
        up_to_tokens: up_to,
        price_per_million: price.into(),
    };
    let tiers = vec![
        tier(Some(1_000_000), "3.00"),
        tier(Some(10_000_000), "2.00"),
        tier(None, "1.00"),
    ];
    let book = billing
        .book(
            "USD",
            vec![
                pb::Rate {
                    price_per_million: String::new(),
                    tier_mode: pb::TierMode::Graduated as i32,
                    tiers: tiers.clone(),
                    ..flat("m", pb::TokenClass::Input, "")
                },
                pb::Rate {
                    price_per_million: String::new(),
                    tier_mode: pb::TierMode::Volume as i32,
                    tiers,
                    ..flat("m", pb::TokenClass::Output, "")
                },
            ],
        )
        .await;
    let tenant = billing
        .tenant("USD", &book, None, pb::RoundingMode::HalfEven)
        .await;
    let last = month(1);
    // Input 12,345,678 and output 1,000,000 over two events: tiers apply to the period's sum.
    billing
        .usage(&tenant, day(&last, 2, 0), "m", tokens(6_000_000, 400_000))
        .await;
    billing
        .usage(&tenant, day(&last, 17, 5), "m", tokens(6_345_678, 600_000))
        .await;

    let invoice = billing.preview(&tenant, &last).await;

    // graduated input: 1,000,000 × 3.00 / 1M = 3.00
    //                  9,000,000 × 2.00 / 1M = 18.00
    //                  2,345,678 × 1.00 / 1M = 2.345678 → 2.35
    // volume output: the total 1,000,000 is on the first bound, so tier 2: 1,000,000 × 2.00 / 1M = 2.00
    assert_eq!(
        lines(&invoice),
        vec![
            (pb::InvoiceLineKind::Tier, dec("3.00"), dec("3.00")),
            (pb::InvoiceLineKind::Tier, dec("18.00"), dec("18.00")),
            (pb::InvoiceLineKind::Tier, dec("2.345678"), dec("2.35")),
            (pb::InvoiceLineKind::Tier, dec("2.00"), dec("2.00")),
        ]
    );
    let bounds: Vec<(Option<i64>, Option<i64>)> = invoice
        .lines
        .iter()
        .map(|l| (l.tier_from_tokens, l.tier_up_to_tokens))
        .collect();
    assert_eq!(
        bounds,
        vec![
            (Some(0), Some(1_000_000)),
            (Some(1_000_000), Some(10_000_000)),
            (Some(10_000_000), None),
            (Some(1_000_000), Some(10_000_000)),
        ]
    );
    // 3.00 + 18.00 + 2.35 + 2.00 = 25.35
    assert_eq!(dec(&invoice.total), dec("25.35"));
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn each_currency_rounds_half_even_to_its_minor_unit_and_tiny_lines_do_not_drift() {
    let app = app().await;
    let mut billing = Billing::new(&app).await;
    let jpy_book = billing
        .book("JPY", vec![flat("m", pb::TokenClass::Input, "1")])
        .await;
    let kwd_book = billing
        .book("KWD", vec![flat("m", pb::TokenClass::Input, "0.0001")])
        .await;
    let models: Vec<String> = (0..20).map(|i| format!("tiny-{i:02}")).collect();
    let usd_book = billing
        .book(
            "USD",
            models
                .iter()
                .map(|m| flat(m, pb::TokenClass::Output, "1.00"))
                .collect(),
        )
        .await;
    let jpy = billing
        .tenant("JPY", &jpy_book, None, pb::RoundingMode::Unspecified)
        .await;
    let kwd = billing
        .tenant("KWD", &kwd_book, None, pb::RoundingMode::Unspecified)
        .await;
    let usd = billing
        .tenant("USD", &usd_book, None, pb::RoundingMode::Unspecified)
        .await;
    let usd_up = billing
        .tenant("USD", &usd_book, None, pb::RoundingMode::HalfUp)
        .await;
    let last = month(1);
    billing
        .usage(&jpy, day(&last, 1, 1), "m", tokens(2_500_000, 0))
        .await;
    billing
        .usage(&kwd, day(&last, 1, 1), "m", tokens(2_500_000, 0))
        .await;
    for (i, model) in models.iter().enumerate() {
        // 4,900 output tokens (0.0049 USD) on 19 models, 5,000 (0.005, a tie) on the last.
        let output = if i == 19 { 5_000 } else { 4_900 };
        billing
            .usage(&usd, day(&last, 3, 2), model, tokens(0, output))
            .await;
        billing
            .usage(&usd_up, day(&last, 3, 2), model, tokens(0, output))
            .await;
    }

    let jpy_invoice = billing.preview(&jpy, &last).await;
    let kwd_invoice = billing.preview(&kwd, &last).await;
    let usd_invoice = billing.preview(&usd, &last).await;
    let usd_up_invoice = billing.preview(&usd_up, &last).await;

    // JPY, exponent 0: 2,500,000 × 1 / 1M = 2.5 → 2 (tie to even)
    assert_eq!(
        lines(&jpy_invoice),
        vec![(pb::InvoiceLineKind::Usage, dec("2.5"), dec("2"))]
    );
    assert_eq!(
        (jpy_invoice.currency_exponent, jpy_invoice.total.as_str()),
        (0, "2")
    );
    // KWD, exponent 3: 2,500,000 × 0.0001 / 1M = 0.00025 → 0.000 (tie to even)
    assert_eq!(
        lines(&kwd_invoice),
        vec![(pb::InvoiceLineKind::Usage, dec("0.00025"), dec("0.000"))]
    );
    assert_eq!(kwd_invoice.currency_exponent, 3);
    // USD, 20 lines: 19 × (0.0049 → 0.00) + (0.005 → 0.00 half-even) = 0.00, although the
    // precise sum 19 × 0.0049 + 0.005 = 0.0981 would round to 0.10.
    assert_eq!(usd_invoice.line_count, 20);
    assert_eq!(dec(&usd_invoice.total), dec("0.00"));
    let precise: Decimal = usd_invoice
        .lines
        .iter()
        .map(|l| dec(&l.precise_amount))
        .sum();
    assert_eq!(precise, dec("0.0981"));
    // The same usage with half-up: only the tie changes, 0.005 → 0.01.
    assert_eq!(dec(&usd_up_invoice.total), dec("0.01"));
    assert_eq!(usd_up_invoice.rounding_mode(), pb::RoundingMode::HalfUp);
    app.stop().await.expect("clean shutdown");
}

/// (class, quantity, unit price, precise, amount) of each line.
fn usage_lines(invoice: &pb::Invoice) -> Vec<(pb::TokenClass, i64, Decimal, Decimal, Decimal)> {
    invoice
        .lines
        .iter()
        .map(|l| {
            (
                l.token_class(),
                l.quantity,
                dec(&l.unit_price),
                dec(&l.precise_amount),
                dec(&l.amount),
            )
        })
        .collect()
}

fn responses_usage(
    input: i64,
    cached: i64,
    written_30m: i64,
    written_12h: i64,
    output: i64,
    reasoning: i64,
) -> pb::usage_event::Usage {
    pb::usage_event::Usage::OpenaiResponses(pb::OpenAiResponsesUsage {
        input_tokens: input,
        input_tokens_details: Some(pb::OpenAiInputTokensDetails {
            cached_tokens: cached,
            cache_write_tokens: written_30m + written_12h,
            cache_write_tokens_details: Some(pb::OpenAiCacheWriteTokensDetails {
                ttl_30m_tokens: written_30m,
                ttl_12h_tokens: written_12h,
            }),
            ..Default::default()
        }),
        output_tokens: output,
        output_tokens_details: Some(pb::OpenAiOutputTokensDetails {
            reasoning_tokens: reasoning,
            ..Default::default()
        }),
        total_tokens: Some(input + output),
    })
}

#[tokio::test]
async fn a_mid_month_price_change_splits_lines_only_where_a_unit_price_changed() {
    use pb::TokenClass::*;
    let app = app().await;
    let mut billing = Billing::new(&app).await;
    let last = month(1);
    let change = last.start + Duration::days(15);
    // JPY (no minor unit): output and reasoning get cheaper mid-month; every other price,
    // the OpenAI cache writes by retention among them, stays.
    let jpy_rates = |output: &str| {
        vec![
            flat("gpt-5", Input, "300"),
            flat("gpt-5", CacheRead, "75"),
            flat("gpt-5", Output, output),
            flat("gpt-5", Reasoning, output),
            flat("gpt-5", CacheWrite30m, "375"),
            flat("gpt-5", CacheWrite12h, "450.000"),
        ]
    };
    let jpy_book = billing.book("JPY", jpy_rates("1200")).await;
    billing
        .version(&jpy_book, "JPY", change, jpy_rates("1000"))
        .await;
    // KWD (3 minor digits), prices of 12 fractional digits; the input price is restated with
    // trailing zeros in the second version, the same value.
    let kwd_book = billing
        .book(
            "KWD",
            vec![
                flat("gpt-5", Input, "0.122625000000"),
                flat("gpt-5", CacheRead, "0.030656250000"),
                flat("gpt-5", Output, "0.490512345678"),
            ],
        )
        .await;
    billing
        .version(
            &kwd_book,
            "KWD",
            change,
            vec![
                flat("gpt-5", Input, "0.122625"),
                flat("gpt-5", CacheRead, "0.03065625"),
                flat("gpt-5", Output, "0.392409876543"),
            ],
        )
        .await;
    let jpy = billing
        .tenant("JPY", &jpy_book, None, pb::RoundingMode::Unspecified)
        .await;
    let kwd = billing
        .tenant("KWD", &kwd_book, None, pb::RoundingMode::Unspecified)
        .await;
    // JPY, as OpenAI Responses usage objects. Day 3: input 1,234,600 of which 400,000 cached
    // and 200,000 written (150,000 for 30 minutes, 50,000 for 12 hours), so 634,600 uncached;
    // output 98,765 of which 12,345 reasoning. Day 20: input 764,900 of which 100,000 cached.
    billing
        .raw_usage(
            &jpy,
            day(&last, 3, 1),
            "gpt-5",
            responses_usage(1_234_600, 400_000, 150_000, 50_000, 98_765, 12_345),
        )
        .await;
    billing
        .raw_usage(
            &jpy,
            day(&last, 20, 1),
            "gpt-5",
            responses_usage(764_900, 100_000, 0, 0, 201_235, 0),
        )
        .await;
    let kwd_tokens = |input, cache_read, output| pb::TokenCounts {
        input,
        cache_read,
        output,
        ..Default::default()
    };
    billing
        .usage(
            &kwd,
            day(&last, 5, 1),
            "gpt-5",
            kwd_tokens(2_345_600, 1_000_000, 123_456),
        )
        .await;
    billing
        .usage(
            &kwd,
            day(&last, 25, 1),
            "gpt-5",
            kwd_tokens(3_456_123, 0, 654_321),
        )
        .await;

    let jpy_draft = billing.preview(&jpy, &last).await;
    let kwd_draft = billing.preview(&kwd, &last).await;
    let jpy_final = billing.finalize(&jpy, &jpy_draft.invoice_id).await;
    let kwd_final = billing.finalize(&kwd, &kwd_draft.invoice_id).await;

    // JPY, one line per class and unit price, rounded half-even to whole yen:
    //   input      (634,600 + 664,900 = 1,299,500) × 300 / 1M = 389.85  → 390
    //              (two lines would have billed 190.38 → 190 and 199.47 → 199: 389)
    //   cache read (400,000 + 100,000 = 500,000)    ×  75 / 1M = 37.5    → 38
    //   output     86,420 (98,765 − 12,345)         × 1200 / 1M = 103.704 → 104
    //   output     201,235                          × 1000 / 1M = 201.235 → 201
    //   reasoning  12,345                           × 1200 / 1M = 14.814  → 15
    //   write 30m  150,000                          × 375 / 1M  = 56.25   → 56
    //   write 12h  50,000                           × 450 / 1M  = 22.5    → 22
    //   total 390 + 38 + 104 + 201 + 15 + 56 + 22 = 826
    let jpy_expected = vec![
        (Input, 1_299_500, dec("300"), dec("389.85"), dec("390")),
        (CacheRead, 500_000, dec("75"), dec("37.5"), dec("38")),
        (Output, 86_420, dec("1200"), dec("103.704"), dec("104")),
        (Output, 201_235, dec("1000"), dec("201.235"), dec("201")),
        (Reasoning, 12_345, dec("1200"), dec("14.814"), dec("15")),
        (CacheWrite30m, 150_000, dec("375"), dec("56.25"), dec("56")),
        (CacheWrite12h, 50_000, dec("450"), dec("22.5"), dec("22")),
    ];
    assert_eq!(usage_lines(&jpy_draft), jpy_expected);
    assert_eq!(usage_lines(&jpy_final), jpy_expected);
    assert_eq!(dec(&jpy_final.total), dec("826"));
    // KWD, rounded half-even to 0.001:
    //   input      (2,345,600 + 3,456,123 = 5,801,723) × 0.122625 / 1M = 0.711436282875
    //              → 0.711 (two lines: 0.2876292 → 0.288 and 0.423807082875 → 0.424: 0.712)
    //   cache read 1,000,000 × 0.03065625 / 1M      = 0.03065625           → 0.031
    //   output     123,456 × 0.490512345678 / 1M    = 0.060556692148023168 → 0.061
    //   output     654,321 × 0.392409876543 / 1M    = 0.256762022829492303 → 0.257
    //   total 0.711 + 0.031 + 0.061 + 0.257 = 1.060
    let kwd_expected = vec![
        (
            Input,
            5_801_723,
            dec("0.122625"),
            dec("0.711436282875"),
            dec("0.711"),
        ),
        (
            CacheRead,
            1_000_000,
            dec("0.03065625"),
            dec("0.03065625"),
            dec("0.031"),
        ),
        (
            Output,
            123_456,
            dec("0.490512345678"),
            dec("0.060556692148023168"),
            dec("0.061"),
        ),
        (
            Output,
            654_321,
            dec("0.392409876543"),
            dec("0.256762022829492303"),
            dec("0.257"),
        ),
    ];
    assert_eq!(usage_lines(&kwd_draft), kwd_expected);
    assert_eq!(usage_lines(&kwd_final), kwd_expected);
    assert_eq!(dec(&kwd_final.total), dec("1.060"));
    // A line summing both versions names neither; a line of one version names it.
    assert_eq!(kwd_final.lines[0].price_book_version_id, None);
    assert!(kwd_final.lines[2].price_book_version_id.is_some());
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_line_rounds_the_sum_of_its_events_not_each_event() {
    let app = app().await;
    let mut billing = Billing::new(&app).await;
    let book = billing
        .book("USD", vec![flat("m", pb::TokenClass::Input, "1.00")])
        .await;
    let tenant = billing
        .tenant("USD", &book, None, pb::RoundingMode::Unspecified)
        .await;
    let last = month(1);
    for day_of_month in [1, 9, 17] {
        billing
            .usage(&tenant, day(&last, day_of_month, 4), "m", tokens(4_000, 0))
            .await;
    }

    let invoice = billing.preview(&tenant, &last).await;

    // Each event: 4,000 × 1.00 / 1M = 0.004 → 0.00, so rounding per event would bill 0.00.
    // The line: 12,000 × 1.00 / 1M = 0.012 → 0.01, rounded once.
    assert_eq!(
        lines(&invoice),
        vec![(pb::InvoiceLineKind::Usage, dec("0.012"), dec("0.01"))]
    );
    assert_eq!(invoice.lines[0].quantity, 12_000);
    assert_eq!(dec(&invoice.total), dec("0.01"));
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn the_database_rejects_any_change_to_a_finalized_invoice_or_its_lines() {
    let app = app().await;
    let mut billing = Billing::new(&app).await;
    let book = billing
        .book("USD", vec![flat("m", pb::TokenClass::Input, "2")])
        .await;
    let tenant = billing
        .tenant("USD", &book, None, pb::RoundingMode::Unspecified)
        .await;
    let last = month(1);
    billing
        .usage(&tenant, day(&last, 4, 4), "m", tokens(1_000_000, 0))
        .await;
    let draft = billing.preview(&tenant, &last).await;
    let invoice = billing.finalize(&tenant, &draft.invoice_id).await;

    let attempts = [
        "UPDATE invoices SET total = 0 WHERE invoice_id = $1",
        "UPDATE invoices SET state = 'draft', number = NULL, finalized_at = NULL WHERE invoice_id = $1",
        "UPDATE invoices SET state = 'void', voided_at = now(), void_reason = 'x',
             replacement_invoice_id = invoice_id, total = 0 WHERE invoice_id = $1",
        "DELETE FROM invoices WHERE invoice_id = $1",
        "UPDATE invoice_lines SET amount = 0 WHERE invoice_id = $1",
        "DELETE FROM invoice_lines WHERE invoice_id = $1",
        "INSERT INTO invoice_lines (invoice_id, tenant_id, line_no, kind, description, precise_amount, amount)
         SELECT invoice_id, tenant_id, 99, 'usage', 'sneaked in', 5, 5 FROM invoices WHERE invoice_id = $1",
        "UPDATE invoice_billed_usage SET amount = 0 WHERE invoice_id = $1",
    ];
    for sql in attempts {
        let error = sqlx::query(sql)
            .bind(&invoice.invoice_id)
            .execute(&app.pool)
            .await
            .expect_err(sql);
        assert!(
            error.to_string().contains("final") || error.to_string().contains("immutable"),
            "{sql}: {error}"
        );
    }
    let truncate = sqlx::query("TRUNCATE invoice_lines")
        .execute(&app.pool)
        .await;
    assert!(truncate.is_err());

    let stored: (String, Decimal, i64) = sqlx::query_as(
        "SELECT state, total, (SELECT count(*) FROM invoice_lines l WHERE l.invoice_id = i.invoice_id)
         FROM invoices i WHERE invoice_id = $1",
    )
    .bind(&invoice.invoice_id)
    .fetch_one(&app.pool)
    .await
    .expect("row");
    // 1,000,000 × 2 / 1M = 2.00, untouched.
    assert_eq!(stored, ("finalized".to_owned(), dec("2.00"), 1));
    app.stop().await.expect("clean shutdown");
}

/// The URL of the database `app` runs on, for a second replica or the CLI.
pub async fn database_url(app: &TestApp) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&app.pool)
        .await
        .expect("database name");
    let mut url = url::Url::parse(&base_database_url()).expect("url");
    url.set_path(&name);
    url.to_string()
}

#[tokio::test]
async fn two_replicas_closing_a_period_at_once_finalize_each_tenant_once_with_gap_free_numbers() {
    let first = spawn_app_with(|s| {
        s.billing.close_interval = std::time::Duration::ZERO;
        s.billing.close_batch_tenants = 3;
    })
    .await;
    let url = database_url(&first).await;
    let second = spawn_app_with(|s| {
        s.database.url = url.clone();
        s.billing.close_interval = std::time::Duration::ZERO;
        s.billing.close_batch_tenants = 4;
    })
    .await;
    let mut one = Billing::new(&first).await;
    let mut two = Billing::new(&second).await;
    let book = one
        .book("USD", vec![flat("m", pb::TokenClass::Input, "1")])
        .await;
    let last = month(1);
    let mut tenants = Vec::new();
    for i in 0..12 {
        let tenant = one
            .tenant("USD", &book, None, pb::RoundingMode::Unspecified)
            .await;
        one.usage(
            &tenant,
            day(&last, i, 1),
            "m",
            tokens(1_000_000 * (i + 1), 0),
        )
        .await;
        tenants.push(tenant);
    }
    let names: Vec<&str> = tenants.iter().map(String::as_str).collect();

    let (a, b) = tokio::join!(one.close(&last, &names), two.close(&last, &names));

    assert_eq!(
        a.invoices_finalized + b.invoices_finalized,
        12,
        "{a:?} {b:?}"
    );
    assert_eq!(a.invoices_already_final + b.invoices_already_final, 12);
    assert!(a.failures.is_empty() && b.failures.is_empty());
    let rows: Vec<(String, String, Decimal)> = sqlx::query_as(
        "SELECT tenant_id, number, total FROM invoices WHERE tenant_id = ANY($1) AND state <> 'draft'",
    )
    .bind(&tenants)
    .fetch_all(&first.pool)
    .await
    .expect("invoices");
    let per_tenant: BTreeSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        (rows.len(), per_tenant.len()),
        (12, 12),
        "one invoice per tenant"
    );
    let year = Utc::now().format("%Y");
    let numbers: BTreeSet<String> = rows.iter().map(|r| r.1.clone()).collect();
    let expected: BTreeSet<String> = (1..=12).map(|n| format!("INV-{year}-{n:06}")).collect();
    assert_eq!(numbers, expected, "numbers 1..=12, no gap, no duplicate");
    // tenant i used (i + 1) M tokens at 1.00 per 1M: Σ 1..=12 = 78.00
    assert_eq!(rows.iter().map(|r| r.2).sum::<Decimal>(), dec("78.00"));
    second.stop().await.expect("clean shutdown");
    first.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn two_replicas_finalizing_one_draft_at_the_same_moment_number_it_once() {
    let first = app().await;
    let url = database_url(&first).await;
    let second = spawn_app_with(|s| {
        s.database.url = url.clone();
        s.billing.close_interval = std::time::Duration::ZERO;
    })
    .await;
    let mut one = Billing::new(&first).await;
    let mut two = Billing::new(&second).await;
    let book = one
        .book("USD", vec![flat("m", pb::TokenClass::Input, "1")])
        .await;
    let last = month(1);
    let tenant = one
        .tenant("USD", &book, None, pb::RoundingMode::Unspecified)
        .await;
    one.usage(&tenant, day(&last, 2, 1), "m", tokens(3_000_000, 0))
        .await;
    let draft = one.preview(&tenant, &last).await.invoice_id;
    // The barrier: the test holds the year's number counter, so whichever finalizer gets
    // furthest waits there and the other waits behind it; both calls are in flight at once.
    sqlx::query(
        "INSERT INTO invoice_number_counters (issuer, year, last_number) VALUES ('INV', $1, 0)
         ON CONFLICT DO NOTHING",
    )
    .bind(Utc::now().year())
    .execute(&first.pool)
    .await
    .expect("counter");
    let mut barrier = first.pool.begin().await.expect("begin");
    sqlx::query("SELECT last_number FROM invoice_number_counters WHERE issuer = 'INV' FOR UPDATE")
        .execute(&mut *barrier)
        .await
        .expect("hold the counter");
    let finalizing = tokio::spawn({
        let (tenant, draft) = (tenant.clone(), draft.clone());
        async move { tokio::join!(one.finalize(&tenant, &draft), two.finalize(&tenant, &draft)) }
    });
    crate::ingest::until_lock_waiters(&first.pool, 2, "both finalizers").await;
    barrier.commit().await.expect("release");
    let (a, b) = finalizing.await.expect("finalizers");

    // 3,000,000 × 1 / 1M = 3.00, finalized once: both answers are that one invoice.
    let year = Utc::now().format("%Y");
    let number = format!("INV-{year}-000001");
    assert_eq!(a.number.as_deref(), Some(number.as_str()));
    assert_eq!(b.number.as_deref(), Some(number.as_str()));
    assert_eq!(
        (a.invoice_id.as_str(), dec(&a.total)),
        (draft.as_str(), dec("3.00"))
    );
    let used: i64 =
        sqlx::query_scalar("SELECT last_number FROM invoice_number_counters WHERE issuer = 'INV'")
            .fetch_one(&first.pool)
            .await
            .expect("counter");
    assert_eq!(used, 1, "one number taken");
    second.stop().await.expect("clean shutdown");
    first.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn late_usage_after_finalization_is_billed_once_on_the_next_invoice_as_an_adjustment() {
    let app = app().await;
    let mut billing = Billing::new(&app).await;
    let (earlier, later) = (month(2), month(1));
    let tenant = billing.two_months_at_three_dollars(&earlier, &later).await;
    let closed = billing.close(&earlier, &[&tenant]).await;
    assert_eq!(closed.invoices_finalized, 1);

    // Arrives after `earlier` was finalized, dated inside it.
    billing
        .usage(&tenant, day(&earlier, 27, 9), "m", tokens(500_000, 0))
        .await;
    let draft = billing.preview(&tenant, &later).await;
    billing.close(&later, &[&tenant]).await;
    let listed = billing
        .invoices
        .list_invoices(pb::ListInvoicesRequest {
            tenant_ids: vec![tenant.clone()],
            include_lines: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .invoices;
    let current = billing.preview(&tenant, &month(0)).await;

    // later: 200,000 × 3.00 / 1M = 0.60, plus the late 500,000 × 3.00 / 1M = 1.50 of `earlier`
    assert_eq!(
        lines(&draft),
        vec![
            (pb::InvoiceLineKind::Usage, dec("0.6"), dec("0.60")),
            (pb::InvoiceLineKind::Adjustment, dec("1.5"), dec("1.50")),
        ]
    );
    let adjustment = &draft.lines[1];
    assert_eq!(adjustment.quantity, 500_000);
    assert_eq!(
        adjustment.original_period.as_ref().map(|p| p.label.clone()),
        Some(earlier.label.to_string())
    );
    // Newest period first; both finalized.
    let totals: Vec<(String, pb::InvoiceState, Decimal)> = listed
        .iter()
        .map(|i| {
            let label = i
                .period
                .as_ref()
                .map(|p| p.label.clone())
                .unwrap_or_default();
            (label, i.state(), dec(&i.total))
        })
        .collect();
    assert_eq!(
        totals,
        vec![
            (
                later.label.to_string(),
                pb::InvoiceState::Finalized,
                dec("2.10")
            ),
            (
                earlier.label.to_string(),
                pb::InvoiceState::Finalized,
                dec("3.00")
            ),
        ]
    );
    // Σ = 3.00 + 2.10 = 5.10 = (1,000,000 + 500,000 + 200,000) × 3.00 / 1M: all usage, once.
    assert_eq!(totals.iter().map(|t| t.2).sum::<Decimal>(), dec("5.10"));
    // Nothing is billed a second time on the next draft.
    assert!(current.lines.is_empty(), "{:?}", current.lines);

    // Voiding `earlier` now: its replacement bills the whole period minus what `later`'s
    // adjustment already billed for it.
    let earlier_id = listed
        .iter()
        .find(|i| i.period.as_ref().map(|p| p.label.as_str()) == Some(&earlier.label.to_string()))
        .map(|i| i.invoice_id.clone())
        .expect("earlier invoice");
    let replacement = billing
        .invoices
        .void_invoice(pb::VoidInvoiceRequest {
            tenant_id: tenant.clone(),
            invoice_id: earlier_id,
            reason: "re-issue".into(),
        })
        .await
        .expect("void")
        .into_inner()
        .replacement_invoice
        .expect("replacement");
    // usage (1,000,000 + 500,000) × 3.00 / 1M = 4.50; already billed on `later`: −1.50
    assert_eq!(
        lines(&replacement),
        vec![
            (pb::InvoiceLineKind::Usage, dec("4.5"), dec("4.50")),
            (pb::InvoiceLineKind::Adjustment, dec("-1.5"), dec("-1.50")),
        ]
    );
    // 3.00 + 2.10 (later) = 5.10 again: voiding and re-issuing bills nothing twice.
    assert_eq!(dec(&replacement.total), dec("3.00"));
    app.stop().await.expect("clean shutdown");
}

/// Late usage racing the finalization of its period, with no folder running (every batch is
/// still queued when the invoice is computed): each event is billed exactly once — on the
/// finalized invoice when its batch committed first, as an adjustment on the next one when
/// after.
#[tokio::test]
async fn a_finalization_racing_unfolded_late_usage_bills_each_event_once() {
    let app = spawn_app_with(|s| {
        s.billing.close_interval = std::time::Duration::ZERO;
        s.fold.enabled = false;
        s.ingest.retention_interval = std::time::Duration::ZERO;
    })
    .await;
    let mut billing = Billing::new(&app).await;
    let (earlier, later) = (month(2), month(1));
    let tenant = billing.two_months_at_three_dollars(&earlier, &later).await;
    // 45 late events of 10,000 tokens dated inside `earlier`, one batch each: 20 before the
    // close, 20 while it runs, 5 after it.
    let late_at = |i: i64| day(&earlier, 20, 0) + Duration::minutes(i);
    for i in 0..20 {
        billing
            .usage(&tenant, late_at(i), "m", tokens(10_000, 0))
            .await;
    }
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM fold_queue")
        .fetch_one(&app.pool)
        .await
        .expect("queue");
    let mut racing = Billing::new(&app).await;
    let tenants = [tenant.as_str()];
    let (closed, ()) = tokio::join!(billing.close(&earlier, &tenants), async {
        for i in 20..40 {
            racing
                .usage(&tenant, late_at(i), "m", tokens(10_000, 0))
                .await;
        }
    });
    for i in 40..45 {
        racing
            .usage(&tenant, late_at(i), "m", tokens(10_000, 0))
            .await;
    }
    billing.close(&later, &[&tenant]).await;
    let invoices = billing
        .invoices
        .list_invoices(pb::ListInvoicesRequest {
            tenant_ids: vec![tenant.clone()],
            include_lines: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .invoices;

    assert_eq!(queued, 22, "nothing was folded before the close");
    assert_eq!(closed.invoices_finalized, 1);
    let quantity = |label: &BillingPeriod, kind: pb::InvoiceLineKind| -> i64 {
        invoices
            .iter()
            .filter(|i| {
                i.period.as_ref().map(|p| p.label.as_str()) == Some(&label.label.to_string())
            })
            .flat_map(|i| &i.lines)
            .filter(|l| l.kind() == kind)
            .map(|l| l.quantity)
            .sum()
    };
    let on_time = quantity(&earlier, pb::InvoiceLineKind::Usage);
    let adjusted = quantity(&later, pb::InvoiceLineKind::Adjustment);
    assert!(on_time >= 1_000_000 + 20 * 10_000, "{on_time}");
    assert!(adjusted >= 5 * 10_000, "{adjusted}");
    assert_eq!(on_time + adjusted, 1_000_000 + 45 * 10_000);
    assert_eq!(quantity(&later, pb::InvoiceLineKind::Usage), 200_000);
    // (1,000,000 + 45 × 10,000 + 200,000) × 3.00 / 1M = 4.95 over both invoices, whatever the
    // race did.
    let total: Decimal = invoices.iter().map(|i| dec(&i.total)).sum();
    assert_eq!(total, dec("4.95"));
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn voiding_records_the_reason_and_the_replacement_is_finalized_with_the_next_number() {
    let app = app().await;
    let mut billing = Billing::new(&app).await;
    let book = billing
        .book("USD", vec![flat("m", pb::TokenClass::Input, "1.25")])
        .await;
    let tenant = billing
        .tenant("USD", &book, None, pb::RoundingMode::Unspecified)
        .await;
    let last = month(1);
    billing
        .usage(&tenant, day(&last, 1, 1), "m", tokens(2_000_000, 0))
        .await;
    let draft = billing.preview(&tenant, &last).await;
    let no_reason = billing
        .invoices
        .void_invoice(pb::VoidInvoiceRequest {
            tenant_id: tenant.clone(),
            invoice_id: draft.invoice_id.clone(),
            reason: String::new(),
        })
        .await
        .expect_err("reason required");
    let of_draft = billing
        .invoices
        .void_invoice(pb::VoidInvoiceRequest {
            tenant_id: tenant.clone(),
            invoice_id: draft.invoice_id.clone(),
            reason: "wrong".into(),
        })
        .await
        .expect_err("drafts cannot be voided");
    let original = billing.finalize(&tenant, &draft.invoice_id).await;

    let void = |reason: &str| pb::VoidInvoiceRequest {
        tenant_id: tenant.clone(),
        invoice_id: original.invoice_id.clone(),
        reason: reason.into(),
    };
    let voided = billing
        .invoices
        .void_invoice(void("customer disputed the march rate"))
        .await
        .expect("void")
        .into_inner();
    let again = billing
        .invoices
        .void_invoice(void("twice"))
        .await
        .expect("void again")
        .into_inner();
    let replacement = voided.replacement_invoice.clone().expect("replacement");
    let finalized = billing.finalize(&tenant, &replacement.invoice_id).await;
    let finalize_void = billing
        .invoices
        .finalize_invoice(pb::FinalizeInvoiceRequest {
            tenant_id: tenant.clone(),
            invoice_id: original.invoice_id.clone(),
            ignore_grace_period: true,
        })
        .await
        .expect_err("a void invoice cannot be finalized");

    assert_eq!(no_reason.code(), Code::InvalidArgument);
    assert!(
        no_reason.message().contains("reason"),
        "{}",
        no_reason.message()
    );
    assert_eq!(of_draft.code(), Code::FailedPrecondition);
    assert_eq!(finalize_void.code(), Code::FailedPrecondition);
    let old = voided.voided_invoice.expect("voided");
    assert_eq!(old.state(), pb::InvoiceState::Void);
    assert_eq!(
        old.void_reason.as_deref(),
        Some("customer disputed the march rate")
    );
    assert_eq!(
        old.number, original.number,
        "a void invoice keeps its number"
    );
    assert_eq!(old.total, original.total);
    assert_eq!(
        old.replacement_invoice_id.as_deref(),
        Some(replacement.invoice_id.as_str())
    );
    assert_eq!(replacement.state(), pb::InvoiceState::Draft);
    assert_eq!(
        replacement.replaces_invoice_id.as_deref(),
        Some(original.invoice_id.as_str())
    );
    // Voiding again returns the same pair, unchanged.
    assert_eq!(
        again.voided_invoice.map(|i| i.void_reason),
        Some(old.void_reason.clone())
    );
    assert_eq!(
        again.replacement_invoice.map(|i| i.invoice_id),
        Some(replacement.invoice_id.clone())
    );
    // 2,000,000 × 1.25 / 1M = 2.50 on both; numbers 1 then 2.
    let year = Utc::now().format("%Y");
    assert_eq!(dec(&original.total), dec("2.50"));
    assert_eq!(dec(&finalized.total), dec("2.50"));
    assert_eq!(original.number, Some(format!("INV-{year}-000001")));
    assert_eq!(finalized.number, Some(format!("INV-{year}-000002")));
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn finalizing_waits_for_period_end_and_grace_and_bad_requests_name_the_field() {
    let app = spawn_app_with(|s| {
        s.billing.close_interval = std::time::Duration::ZERO;
        s.billing.finalize_grace = std::time::Duration::from_secs(400 * 24 * 3600);
    })
    .await;
    let mut billing = Billing::new(&app).await;
    let book = billing
        .book("USD", vec![flat("m", pb::TokenClass::Input, "1")])
        .await;
    let tenant = billing
        .tenant("USD", &book, None, pb::RoundingMode::Unspecified)
        .await;
    billing
        .usage(&tenant, day(&month(1), 1, 1), "m", tokens(10, 0))
        .await;
    let current = billing.preview(&tenant, &month(0)).await;
    let last = billing.preview(&tenant, &month(1)).await;

    let open = billing
        .invoices
        .finalize_invoice(pb::FinalizeInvoiceRequest {
            tenant_id: tenant.clone(),
            invoice_id: current.invoice_id.clone(),
            ignore_grace_period: true,
        })
        .await
        .expect_err("the period has not ended");
    let in_grace = billing
        .invoices
        .finalize_invoice(pb::FinalizeInvoiceRequest {
            tenant_id: tenant.clone(),
            invoice_id: last.invoice_id.clone(),
            ignore_grace_period: false,
        })
        .await
        .expect_err("grace period");
    let bad_period = billing
        .invoices
        .preview_invoice(pb::PreviewInvoiceRequest {
            tenant_id: tenant.clone(),
            period: "2026-13".into(),
            currency: String::new(),
        })
        .await
        .expect_err("bad period");
    let future = billing
        .invoices
        .preview_invoice(pb::PreviewInvoiceRequest {
            tenant_id: tenant.clone(),
            period: "2999-01".into(),
            currency: String::new(),
        })
        .await
        .expect_err("future period");
    let close = billing
        .invoices
        .close_period(pb::ClosePeriodRequest {
            period: month(1).label.to_string(),
            tenant_ids: vec![tenant.clone()],
            ..Default::default()
        })
        .await
        .expect("close")
        .into_inner();
    let unknown = billing
        .invoices
        .get_invoice(pb::GetInvoiceRequest {
            tenant_id: tenant.clone(),
            invoice_id: "nope".into(),
        })
        .await
        .expect_err("unknown invoice");

    assert_eq!(open.code(), Code::FailedPrecondition);
    assert!(open.message().contains("ends"), "{}", open.message());
    assert_eq!(in_grace.code(), Code::FailedPrecondition);
    assert!(
        in_grace.message().contains("grace period ends"),
        "{}",
        in_grace.message()
    );
    assert_eq!(bad_period.code(), Code::InvalidArgument);
    assert!(
        bad_period.message().starts_with("period:"),
        "{}",
        bad_period.message()
    );
    assert_eq!(future.code(), Code::InvalidArgument);
    assert_eq!(close.invoices_finalized, 0);
    assert_eq!(close.failures.len(), 1);
    assert!(close.failures[0].reason.starts_with("grace period ends"));
    assert_eq!(unknown.code(), Code::NotFound);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn bill_close_on_the_command_line_finalizes_a_period() {
    let app = app().await;
    let mut billing = Billing::new(&app).await;
    let book = billing
        .book("USD", vec![flat("m", pb::TokenClass::Input, "1")])
        .await;
    let tenant = billing
        .tenant("USD", &book, None, pb::RoundingMode::Unspecified)
        .await;
    let last = month(1);
    billing
        .usage(&tenant, day(&last, 2, 2), "m", tokens(3_000_000, 0))
        .await;
    let url = database_url(&app).await;
    let run = |extra: &[&str]| {
        let mut command = tokenmeter_command();
        command
            .args([
                "bill",
                "close",
                "--period",
                &last.label.to_string(),
                "--tenant",
                &tenant,
            ])
            .args(extra)
            .env("TOKENMETER_DATABASE__URL", &url);
        command.output().expect("run tokenmeter bill close")
    };

    let dry = run(&["--ignore-grace-period", "--dry-run"]);
    let real = run(&["--ignore-grace-period"]);
    let again = run(&["--ignore-grace-period"]);

    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(dry.status.success() && real.status.success() && again.status.success());
    assert!(
        text(&dry).contains("1 invoice(s) to finalize"),
        "{}",
        text(&dry)
    );
    assert!(
        text(&real).contains("1 invoice(s) finalized"),
        "{}",
        text(&real)
    );
    assert!(
        text(&again).contains("0 invoice(s) finalized, 1 already final"),
        "{}",
        text(&again)
    );
    let total: Decimal = sqlx::query_scalar(
        "SELECT total FROM invoices WHERE tenant_id = $1 AND state = 'finalized'",
    )
    .bind(&tenant)
    .fetch_one(&app.pool)
    .await
    .expect("finalized invoice");
    // 3,000,000 × 1 / 1M = 3.00
    assert_eq!(total, dec("3.00"));
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn the_background_job_finalizes_ended_periods_after_the_grace_period() {
    let app = spawn_app_with(|s| {
        s.billing.close_interval = std::time::Duration::from_millis(300);
        s.billing.finalize_grace = std::time::Duration::ZERO;
    })
    .await;
    let mut billing = Billing::new(&app).await;
    let book = billing
        .book("USD", vec![flat("m", pb::TokenClass::Input, "1")])
        .await;
    let tenant = billing
        .tenant("USD", &book, None, pb::RoundingMode::Unspecified)
        .await;
    billing
        .usage(&tenant, day(&month(1), 3, 3), "m", tokens(1_000_000, 0))
        .await;

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let finalized = loop {
        let found: Option<Decimal> = sqlx::query_scalar(
            "SELECT total FROM invoices WHERE tenant_id = $1 AND period_label = $2 AND state = 'finalized'",
        )
        .bind(&tenant)
        .bind(month(1).label.to_string())
        .fetch_optional(&app.pool)
        .await
        .expect("query");
        if found.is_some() || std::time::Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };

    // 1,000,000 × 1 / 1M = 1.00
    assert_eq!(finalized, Some(dec("1.00")));
    app.stop().await.expect("clean shutdown");
}
