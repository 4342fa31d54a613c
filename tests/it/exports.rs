//! Finance exports against the real Postgres: the CLI and the gRPC stream give the same bytes,
//! twice; manifests reconcile with the invoices; watermarks return only what is new.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::Duration;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use tokenmeter::proto::v1 as pb;
use tokenmeter::proto::v1::export_service_client::ExportServiceClient;
use tonic::Code;

use crate::auth::key;
use crate::billing::{database_url, month};
use crate::helpers::{ADMIN_KEY, TestApp, authed, spawn_app_with, tokenmeter_command};
use crate::usage_support::{Clients, ts, unique};

/// Tenants in USD and EUR, with usage last month, finalized.
struct Scenario {
    app: TestApp,
    api: Clients,
    book_usd: String,
    tenants: Vec<String>,
}

impl Scenario {
    async fn new() -> Self {
        let app = spawn_app_with(|s| s.billing.close_interval = std::time::Duration::ZERO).await;
        let mut api = Clients::new(app.channel().await);
        let rates = [
            ("gpt-4.1-mini", pb::TokenClass::Input, "0.40", "0.30"),
            ("gpt-4.1-mini", pb::TokenClass::Output, "1.60", "1.20"),
        ];
        let book_usd = unique("usd");
        let book_eur = unique("eur");
        api.version(&book_usd, "USD", month(6).start, &rates).await;
        api.version(&book_eur, "EUR", month(6).start, &rates).await;
        let mut scenario = Self {
            app,
            api,
            book_usd: book_usd.clone(),
            tenants: Vec::new(),
        };
        for (book, currency, input) in [
            (&book_usd, "USD", 1_234_567),
            (&book_usd, "USD", 7_000_001),
            (&book_eur, "EUR", 3_333_333),
        ] {
            let tenant = scenario.api.tenant(currency, "UTC", Some(book)).await;
            scenario.usage(&tenant, input).await;
            scenario.tenants.push(tenant);
        }
        let tenants = scenario.tenants.clone();
        scenario.close(&tenants).await;
        scenario
    }

    async fn usage(&mut self, tenant: &str, input: i64) {
        let response = self
            .api
            .ingest(vec![pb::UsageEvent {
                event_id: unique("e"),
                source: "export-test".into(),
                tenant_id: tenant.to_owned(),
                agent_id: "agent, \"quoted\"".into(),
                provider: "openai".into(),
                model: "gpt-4.1-mini".into(),
                occurred_at: Some(ts(month(1).start + Duration::days(3))),
                usage: Some(pb::usage_event::Usage::Tokens(pb::TokenCounts {
                    input,
                    output: input / 7,
                    ..Default::default()
                })),
                ..Default::default()
            }])
            .await;
        assert_eq!(response.results[0].status(), pb::IngestStatus::Accepted);
    }

    async fn close(&mut self, tenants: &[String]) {
        self.api
            .invoices
            .close_period(pb::ClosePeriodRequest {
                period: month(1).label.to_string(),
                tenant_ids: tenants.to_vec(),
                ignore_grace_period: true,
                dry_run: false,
            })
            .await
            .expect("close period");
    }

    async fn invoices(&mut self) -> Vec<pb::Invoice> {
        self.api
            .invoices
            .list_invoices(pb::ListInvoicesRequest {
                tenant_ids: self.tenants.clone(),
                period: month(1).label.to_string(),
                include_lines: true,
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("list invoices")
            .into_inner()
            .invoices
    }

    /// `tokenmeter export KIND --period <last month> --tenant … ARGS --out DIR`.
    async fn cli(&self, kind: &str, out: &Path, args: &[&str]) -> Manifest {
        let url = database_url(&self.app).await;
        let mut command = tokenmeter_command();
        command
            .args([
                "export",
                kind,
                "--period",
                &month(1).label.to_string(),
                "--out",
            ])
            .arg(out)
            .args(args)
            .env("TOKENMETER_DATABASE__URL", url);
        for tenant in &self.tenants {
            command.args(["--tenant", tenant]);
        }
        let output = command.output().expect("run tokenmeter export");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let manifest = std::fs::read(out.join("manifest.json")).expect("manifest.json");
        serde_json::from_slice(&manifest).expect("manifest parses")
    }
}

#[derive(Debug, serde::Deserialize)]
struct Manifest {
    row_count: u64,
    files: Vec<File>,
    totals: Vec<Total>,
    watermark: String,
    columns: Vec<String>,
    schema_version: i32,
}

#[derive(Debug, serde::Deserialize)]
struct File {
    file_name: String,
    row_count: u64,
    size_bytes: u64,
    sha256: String,
}

#[derive(Debug, serde::Deserialize)]
struct Total {
    currency: String,
    column: String,
    amount: Decimal,
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn dec(text: &str) -> Decimal {
    text.parse().expect("decimal")
}

/// The one data file of an export, checked against its manifest entry.
fn data_file(dir: &Path, manifest: &Manifest) -> Vec<u8> {
    assert_eq!(manifest.files.len(), 1);
    let file = &manifest.files[0];
    let bytes = std::fs::read(dir.join(&file.file_name)).expect("data file");
    assert_eq!(file.size_bytes, bytes.len() as u64);
    assert_eq!(file.sha256, hex_sha256(&bytes));
    assert_eq!(file.row_count, manifest.row_count);
    bytes
}

fn csv_rows(bytes: &[u8]) -> (Vec<String>, Vec<BTreeMap<String, String>>) {
    let mut reader = csv::Reader::from_reader(bytes);
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(str::to_owned)
        .collect();
    let rows = reader
        .records()
        .map(|r| {
            let r = r.expect("csv record");
            header
                .iter()
                .cloned()
                .zip(r.iter().map(str::to_owned))
                .collect()
        })
        .collect();
    (header, rows)
}

/// Streams an export and reassembles its files; returns them with the manifest (last).
async fn stream(
    stream: tonic::Streaming<pb::ExportResponse>,
) -> (BTreeMap<String, Vec<u8>>, pb::ExportManifest) {
    let mut stream = stream;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut manifest = None;
    while let Some(message) = stream.message().await.expect("stream message") {
        assert!(manifest.is_none(), "the manifest must be the last message");
        match message.payload.expect("payload") {
            pb::export_response::Payload::Chunk(chunk) => {
                assert!(chunk.data.len() <= 1 << 20);
                let file = files.entry(chunk.file_name).or_default();
                assert_eq!(chunk.offset, file.len() as i64);
                file.extend(chunk.data);
            }
            pb::export_response::Payload::Manifest(m) => manifest = Some(m),
        }
    }
    (files, manifest.expect("a manifest"))
}

fn selection(tenants: &[String], format: pb::ExportFormat) -> pb::ExportSelection {
    pb::ExportSelection {
        range: Some(pb::export_selection::Range::Period(
            month(1).label.to_string(),
        )),
        tenant_ids: tenants.to_vec(),
        format: format as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn invoice_exports_are_byte_identical_twice_reconcile_with_invoices_and_match_grpc() {
    let mut scenario = Scenario::new().await;
    let invoices = scenario.invoices().await;
    assert_eq!(invoices.len(), 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, second) = (dir.path().join("1"), dir.path().join("2"));

    let manifest = scenario.cli("invoices", &first, &[]).await;
    let again = scenario.cli("invoices", &second, &[]).await;

    let bytes = data_file(&first, &manifest);
    assert_eq!(bytes, data_file(&second, &again), "not byte-identical");
    assert_eq!(
        manifest.files[0].file_name,
        format!("invoices-{}.csv", month(1).label)
    );
    assert_eq!(manifest.schema_version, 1);
    // Σ Invoice.total per currency, from the invoices as the API returns them.
    let mut expected: BTreeMap<String, Decimal> = BTreeMap::new();
    for invoice in &invoices {
        *expected.entry(invoice.currency.clone()).or_default() += dec(&invoice.total);
    }
    let totals: BTreeMap<String, Decimal> = manifest
        .totals
        .iter()
        .filter(|t| t.column == "total")
        .map(|t| (t.currency.clone(), t.amount))
        .collect();
    assert_eq!(totals, expected);
    // The CSV parses back, and each row's values are the invoice's.
    let (header, rows) = csv_rows(&bytes);
    assert_eq!(header, manifest.columns);
    assert_eq!(rows.len(), 3);
    assert!(
        bytes.windows(2).filter(|w| w == b"\r\n").count() == 4,
        "CRLF line ends"
    );
    for invoice in &invoices {
        let row = rows
            .iter()
            .find(|r| r["invoice_id"] == invoice.invoice_id)
            .expect("exported invoice");
        assert_eq!(row["total"], invoice.total);
        assert_eq!(row["subtotal"], invoice.subtotal);
        assert_eq!(Some(&row["number"]), invoice.number.as_ref());
        assert_eq!(row["state"], "finalized");
        assert_eq!(row["tenant_id"], invoice.tenant_id);
    }

    // The same export over gRPC reassembles into the same bytes.
    let mut exports = ExportServiceClient::new(authed(scenario.app.channel().await, ADMIN_KEY));
    let response = exports
        .export_invoices(pb::ExportInvoicesRequest {
            selection: Some(selection(&scenario.tenants, pb::ExportFormat::Csv)),
            states: vec![],
        })
        .await
        .expect("export invoices");
    let (files, streamed) = stream(response.into_inner()).await;
    assert_eq!(files.get(&manifest.files[0].file_name), Some(&bytes));
    assert_eq!(streamed.files[0].sha256, manifest.files[0].sha256);
    assert_eq!(streamed.row_count, 3);
    assert!(streamed.generated_at.is_some());
    scenario.app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn invoice_lines_round_trip_as_csv_and_jsonl_and_sum_to_the_invoice_totals() {
    let mut scenario = Scenario::new().await;
    let invoices = scenario.invoices().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (csv_dir, jsonl_dir) = (dir.path().join("csv"), dir.path().join("jsonl"));

    let csv_manifest = scenario.cli("invoice-lines", &csv_dir, &[]).await;
    let jsonl_manifest = scenario
        .cli("invoice-lines", &jsonl_dir, &["--format", "jsonl"])
        .await;

    let (_, rows) = csv_rows(&data_file(&csv_dir, &csv_manifest));
    let lines: Vec<serde_json::Value> = String::from_utf8(data_file(&jsonl_dir, &jsonl_manifest))
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let expected_lines: usize = invoices.iter().map(|i| i.lines.len()).sum();
    assert_eq!(rows.len(), expected_lines);
    assert_eq!(lines.len(), expected_lines);
    for invoice in &invoices {
        let csv_sum: Decimal = rows
            .iter()
            .filter(|r| r["invoice_id"] == invoice.invoice_id)
            .map(|r| dec(&r["amount"]))
            .sum();
        let json_sum: Decimal = lines
            .iter()
            .filter(|l| l["invoice_id"] == invoice.invoice_id.as_str())
            .map(|l| dec(l["amount"].as_str().expect("amount is a string")))
            .sum();
        assert_eq!(csv_sum, dec(&invoice.total), "{}", invoice.invoice_id);
        assert_eq!(json_sum, dec(&invoice.total));
        for (line, json) in invoice.lines.iter().zip(
            lines
                .iter()
                .filter(|l| l["invoice_id"] == invoice.invoice_id.as_str()),
        ) {
            assert_eq!(json["amount"], line.amount.as_str());
            assert_eq!(json["quantity"].as_i64(), Some(line.quantity));
        }
    }
    let usd: Decimal = invoices
        .iter()
        .filter(|i| i.currency == "USD")
        .map(|i| dec(&i.total))
        .sum();
    assert!(
        jsonl_manifest
            .totals
            .iter()
            .any(|t| t.currency == "USD" && t.column == "amount" && t.amount == usd)
    );
    scenario.app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn since_a_watermark_only_newly_finalized_invoices_are_exported_and_until_reproduces() {
    let mut scenario = Scenario::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let full = scenario
        .cli("invoice-lines", &dir.path().join("full"), &[])
        .await;

    let nothing = scenario
        .cli(
            "invoice-lines",
            &dir.path().join("nothing"),
            &["--since-watermark", &full.watermark],
        )
        .await;
    assert_eq!(nothing.row_count, 0);
    assert!(nothing.totals.is_empty());

    // A fourth tenant is finalized after the watermark.
    let late = scenario
        .api
        .tenant("USD", "UTC", Some(&scenario.book_usd.clone()))
        .await;
    scenario.usage(&late, 42_000_000).await;
    scenario.close(std::slice::from_ref(&late)).await;
    scenario.tenants.push(late.clone());
    let delta_dir = dir.path().join("delta");
    let delta = scenario
        .cli(
            "invoice-lines",
            &delta_dir,
            &["--since-watermark", &full.watermark],
        )
        .await;
    let (_, rows) = csv_rows(&data_file(&delta_dir, &delta));
    assert!(!rows.is_empty());
    assert!(rows.iter().all(|r| r["tenant_id"] == late), "{rows:?}");

    // As of the first watermark, the export is the first one again, byte for byte.
    let replay_dir = dir.path().join("replay");
    let replay = scenario
        .cli(
            "invoice-lines",
            &replay_dir,
            &["--until-watermark", &full.watermark],
        )
        .await;
    assert_eq!(replay.files[0].sha256, full.files[0].sha256);
    assert_eq!(replay.watermark, full.watermark);
    scenario.app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn usage_and_transactions_export_deltas_since_a_watermark() {
    let mut scenario = Scenario::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let first = scenario
        .cli("usage", &dir.path().join("u1"), &["--raw-events"])
        .await;
    assert_eq!(first.row_count, 3);

    let tenant = scenario.tenants[0].clone();
    scenario.usage(&tenant, 5).await;
    let delta_dir = dir.path().join("u2");
    let delta = scenario
        .cli(
            "usage",
            &delta_dir,
            &["--since-watermark", &first.watermark],
        )
        .await;
    let (_, rows) = csv_rows(&data_file(&delta_dir, &delta));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["input"], "5");
    assert_eq!(rows[0]["agent_id"], "agent, \"quoted\"");
    assert_eq!(rows[0]["events"], "1");

    let transactions = scenario
        .cli(
            "transactions",
            &dir.path().join("t"),
            &["--lifecycle-events", "--format", "jsonl"],
        )
        .await;
    assert_eq!(transactions.row_count, 0);
    scenario.app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_key_bound_to_one_tenant_cannot_export_another() {
    let mut scenario = Scenario::new().await;
    let (_, secret) = key(
        &mut scenario.api,
        &[pb::ApiKeyScope::Read],
        &[&scenario.tenants[0]],
    )
    .await;
    let mut exports = ExportServiceClient::new(authed(scenario.app.channel().await, &secret));

    let denied = exports
        .export_invoices(pb::ExportInvoicesRequest {
            selection: Some(selection(&scenario.tenants[1..2], pb::ExportFormat::Csv)),
            states: vec![],
        })
        .await
        .expect_err("another tenant");
    let own = exports
        .export_invoice_lines(pb::ExportInvoiceLinesRequest {
            selection: Some(selection(&[], pb::ExportFormat::Jsonl)),
            states: vec![],
        })
        .await
        .expect("own tenant");
    let bad = exports
        .export_invoices(pb::ExportInvoicesRequest {
            selection: Some(pb::ExportSelection {
                since_watermark: "yesterday".into(),
                ..selection(&[], pb::ExportFormat::Csv)
            }),
            states: vec![],
        })
        .await
        .expect_err("bad watermark");

    assert_eq!(denied.code(), Code::PermissionDenied);
    let (files, manifest) = stream(own.into_inner()).await;
    let text = String::from_utf8(files.into_values().next().expect("a file")).expect("utf-8");
    assert!(manifest.row_count > 0);
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(value["tenant_id"], scenario.tenants[0].as_str());
    }
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("selection.since_watermark"),
        "{}",
        bad.message()
    );
    scenario.app.stop().await.expect("clean shutdown");
}

/// One order of `tenant` last month: started, completed for 42.50 USD, refunded 5.00, and one
/// call of 1,000,000 input tokens spent on it.
async fn refunded_order(scenario: &mut Scenario, tenant: &str) {
    let at = |days| Some(ts(month(1).start + Duration::days(days)));
    let lifecycle = |id: &str, days, kind| pb::TransactionEvent {
        event_id: id.to_owned(),
        source: "shop".to_owned(),
        tenant_id: tenant.to_owned(),
        transaction_id: "order-1".to_owned(),
        agent_id: "agent-1".to_owned(),
        service: "delivery".to_owned(),
        occurred_at: at(days),
        kind: Some(kind),
        attributes: Default::default(),
    };
    let usd = |amount: &str| {
        Some(pb::Money {
            amount: amount.to_owned(),
            currency: "USD".to_owned(),
        })
    };
    use pb::transaction_event::Kind;
    scenario
        .api
        .transactions
        .record_transaction_events(pb::RecordTransactionEventsRequest {
            events: vec![
                lifecycle("o1-start", 4, Kind::Started(pb::TransactionStarted {})),
                lifecycle(
                    "o1-done",
                    4,
                    Kind::Completed(pb::TransactionCompleted {
                        revenue: usd("42.50"),
                    }),
                ),
                lifecycle(
                    "o1-refund",
                    5,
                    Kind::Refunded(pb::TransactionRefunded {
                        amount: usd("5.00"),
                        reason: "late".to_owned(),
                    }),
                ),
            ],
            omit_accepted_results: false,
        })
        .await
        .expect("record lifecycle");
    let response = scenario
        .api
        .ingest(vec![pb::UsageEvent {
            event_id: unique("e"),
            source: "export-test".into(),
            tenant_id: tenant.to_owned(),
            agent_id: "agent-1".into(),
            transaction_id: Some("order-1".into()),
            service: Some("delivery".into()),
            provider: "openai".into(),
            model: "gpt-4.1-mini".into(),
            occurred_at: at(4),
            usage: Some(pb::usage_event::Usage::Tokens(pb::TokenCounts {
                input: 1_000_000,
                ..Default::default()
            })),
            ..Default::default()
        }])
        .await;
    assert_eq!(response.results[0].status(), pb::IngestStatus::Accepted);
}

#[tokio::test]
async fn attribution_and_transaction_exports_carry_the_figures_the_reports_give() {
    let mut scenario = Scenario::new().await;
    let tenant = scenario.tenants[0].clone();
    refunded_order(&mut scenario, &tenant).await;
    let mut exports = ExportServiceClient::new(authed(scenario.app.channel().await, ADMIN_KEY));
    let only = [tenant.clone()];

    let (files, manifest) = stream(
        exports
            .export_transactions(pb::ExportTransactionsRequest {
                selection: Some(selection(&only, pb::ExportFormat::Csv)),
                lifecycle_events: false,
            })
            .await
            .expect("export transactions")
            .into_inner(),
    )
    .await;
    let (_, rows) = csv_rows(files.values().next().expect("a file"));
    assert_eq!(manifest.row_count, 1);
    let order = &rows[0];
    let stored = scenario
        .api
        .transactions
        .get_transaction(pb::GetTransactionRequest {
            tenant_id: tenant.clone(),
            transaction_id: "order-1".into(),
            include_events: false,
        })
        .await
        .expect("get transaction")
        .into_inner()
        .transaction
        .expect("transaction");
    let amount = |m: &Option<pb::Money>| dec(&m.as_ref().expect("money").amount);
    assert_eq!(order["transaction_id"], "order-1");
    assert_eq!(order["state"], "refunded");
    assert_eq!(dec(&order["revenue"]), amount(&stored.revenue));
    assert_eq!(dec(&order["refunds"]), amount(&stored.refunded));
    assert_eq!(dec(&order["net_revenue"]), amount(&stored.net_revenue));
    assert_eq!(dec(&order["net_revenue"]), dec("42.50") - dec("5.00"));
    assert_eq!(order["event_count"], "3");

    let (files, manifest) = stream(
        exports
            .export_attribution(pb::ExportAttributionRequest {
                selection: Some(selection(&only, pb::ExportFormat::Csv)),
                window: pb::TimeBucket::None as i32,
                ..Default::default()
            })
            .await
            .expect("export attribution")
            .into_inner(),
    )
    .await;
    let (_, rows) = csv_rows(files.values().next().expect("a file"));
    assert_eq!(manifest.row_count, 1);
    let exported = &rows[0];
    let report = scenario
        .api
        .reports
        .get_attribution(pb::GetAttributionRequest {
            tenant_ids: vec![tenant.clone()],
            time_range: Some(pb::TimeRange {
                start: Some(ts(month(1).start)),
                end: Some(ts(month(1).end)),
            }),
            window: pb::TimeBucket::None as i32,
            group_by: vec![pb::AttributionDimension::Tenant as i32],
            ..Default::default()
        })
        .await
        .expect("attribution")
        .into_inner()
        .rows;
    assert_eq!(report.len(), 1);
    let reported = &report[0];
    for (column, value) in [
        ("revenue", &reported.revenue),
        ("refunds", &reported.refunds),
        ("net_revenue", &reported.net_revenue),
        ("spend", &reported.spend),
        ("cost", &reported.cost),
        ("gross_margin", &reported.gross_margin),
        ("token_margin", &reported.token_margin),
        ("refunded_spend", &reported.refunded_spend),
        ("unattributed_spend", &reported.unattributed_spend),
    ] {
        assert_eq!(dec(&exported[column]), dec(value), "{column}");
    }
    for (column, value) in [
        ("transactions_started", reported.transactions_started),
        ("transactions_completed", reported.transactions_completed),
        ("transactions_refunded", reported.transactions_refunded),
        ("total_tokens", reported.total_tokens),
        ("unattributed_tokens", reported.unattributed_tokens),
    ] {
        assert_eq!(exported[column], value.to_string(), "{column}");
    }
    // By hand: the order's call is 1,000,000 input tokens at 0.40 per million, refunded since;
    // the scenario's call is unattributed: 1,234,567 input at 0.40 and 176,366 output at 1.60.
    let order_spend = dec("0.40");
    let unattributed = dec("1234567") * dec("0.40") / dec("1000000")
        + dec("176366") * dec("1.60") / dec("1000000");
    assert_eq!(dec(&exported["refunded_spend"]), order_spend);
    assert_eq!(dec(&exported["unattributed_spend"]), unattributed);
    assert_eq!(dec(&exported["spend"]), order_spend + unattributed);
    assert_eq!(dec(&exported["net_revenue"]), dec("37.50"));
    assert_eq!(
        (
            exported["transactions_completed"].as_str(),
            exported["transactions_refunded"].as_str()
        ),
        ("1", "1")
    );
    scenario.app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn attribution_in_a_half_hour_zone_is_refused_naming_the_tenant_unless_it_can_be_cut() {
    let app = spawn_app_with(|_| {}).await;
    let mut api = Clients::new(app.channel().await);
    let kolkata = api.tenant("USD", "Asia/Kolkata", None).await;
    let mut exports = ExportServiceClient::new(authed(app.channel().await, ADMIN_KEY));
    let request =
        |range: pb::export_selection::Range, window: pb::TimeBucket| pb::ExportAttributionRequest {
            selection: Some(pb::ExportSelection {
                range: Some(range),
                tenant_ids: vec![kolkata.clone()],
                format: pb::ExportFormat::Csv as i32,
                ..Default::default()
            }),
            window: window as i32,
            ..Default::default()
        };
    let last_month = pb::export_selection::Range::Period(month(1).label.to_string());
    let utc_hours = pb::export_selection::Range::TimeRange(pb::TimeRange {
        start: Some(ts(month(1).start)),
        end: Some(ts(month(1).end)),
    });

    // An export fails when the call does or, once streaming, at its first message.
    let mut refusal = async |request: pb::ExportAttributionRequest| match exports
        .export_attribution(request)
        .await
    {
        Err(status) => status,
        Ok(response) => response
            .into_inner()
            .message()
            .await
            .expect_err("refused while streaming"),
    };
    // Its billing month starts at 18:30 UTC; its local days too.
    let by_period = refusal(request(last_month, pb::TimeBucket::None)).await;
    let by_day = refusal(request(utc_hours.clone(), pb::TimeBucket::Day)).await;
    let whole = exports
        .export_attribution(request(utc_hours, pb::TimeBucket::None))
        .await
        .expect("one bucket over whole UTC hours");

    for (refused, field) in [(by_period, "period"), (by_day, "time_zone")] {
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(
            refused.message().contains(field) && refused.message().contains(&kolkata),
            "{}",
            refused.message()
        );
    }
    let (_, manifest) = stream(whole.into_inner()).await;
    assert_eq!(manifest.row_count, 0);
    app.stop().await.expect("clean shutdown");
}
