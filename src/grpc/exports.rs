//! ExportService: the gRPC twin of `tokenmeter export`. Checks the request and the caller's
//! READ scope on every tenant concerned, then streams what `export::run` produces: chunks,
//! then the manifest, last.

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::principal;
use super::convert::{required_time, timestamp};
use super::invoices::states_from_proto;
use super::reports::{attribution_grouping, readable_tenants};
use super::status::{from_store, invalid, invalid_field};
use crate::domain::attribution::Grouping;
use crate::domain::invoice::InvoiceState;
use crate::domain::period::PeriodLabel;
use crate::export::encode::{Chunk, Format};
use crate::export::manifest::Manifest;
use crate::export::run::{ExportError, Sink};
use crate::export::schema::Kind;
use crate::export::watermark::Watermark;
use crate::export::{
    Bucket, ExportRequest, Filters, Range, Rows, Selection, UsageGrouping, default_states,
};
use crate::proto::v1 as pb;
use crate::proto::v1::export_service_server::ExportService;

/// Chunks in flight per stream (each up to 1 MiB): bounds memory when the client reads slowly.
const STREAM_BUFFER: usize = 4;

pub struct ExportApi {
    pool: PgPool,
}

impl ExportApi {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Streams `rows` over the selection after the caller's rights are checked.
    fn start<T>(
        &self,
        request: &Request<T>,
        selection: Option<&pb::ExportSelection>,
        rows: Rows,
    ) -> Result<Response<ExportStream>, Status> {
        let caller = principal(request)?;
        let selection = selection.ok_or_else(|| invalid_field("selection", "is required"))?;
        let tenants = match readable_tenants(&caller, &selection.tenant_ids)? {
            None => Some(Vec::new()),
            Some(named) if named.is_empty() => None,
            Some(named) => Some(named),
        };
        let request = ExportRequest {
            rows,
            selection: resolve(selection, tenants)?,
        };
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let mut sink = Chunks(sender.clone());
            let last =
                crate::export::run::run(&pool, &request, &mut sink, &mut |_, _| {}, Utc::now())
                    .await
                    .map(|manifest| pb::ExportResponse {
                        payload: Some(pb::export_response::Payload::Manifest(manifest_to_proto(
                            manifest,
                        ))),
                    })
                    .map_err(status);
            // A client that went away needs no last message.
            let _ = sender.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

type ExportStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<pb::ExportResponse, Status>> + Send + 'static>,
>;

struct Chunks(mpsc::Sender<Result<pb::ExportResponse, Status>>);

impl Sink for Chunks {
    async fn send(&mut self, chunk: Chunk) -> Result<(), ExportError> {
        let message = pb::ExportResponse {
            payload: Some(pb::export_response::Payload::Chunk(pb::ExportChunk {
                file_name: chunk.file_name,
                data: chunk.data,
                offset: i64::try_from(chunk.offset).unwrap_or(i64::MAX),
            })),
        };
        self.0
            .send(Ok(message))
            .await
            .map_err(|_| ExportError::Closed)
    }
}

fn status(error: ExportError) -> Status {
    match error {
        ExportError::Invalid(e) => invalid(e),
        ExportError::Precondition(reason) => Status::failed_precondition(reason),
        ExportError::Store(e) => from_store(e),
        ExportError::Closed => Status::cancelled("the client went away"),
        ExportError::Write { .. } => {
            tracing::error!(error = %error, "export failed");
            Status::internal("export failed")
        }
    }
}

fn resolve(
    selection: &pb::ExportSelection,
    tenants: Option<Vec<String>>,
) -> Result<Selection, Status> {
    use pb::export_selection::Range as PbRange;
    let range = match &selection.range {
        Some(PbRange::Period(period)) => {
            Range::Period(PeriodLabel::parse(period, "selection.period").map_err(invalid)?)
        }
        Some(PbRange::TimeRange(range)) => {
            let start = required_time(range.start.as_ref(), "selection.time_range.start")?;
            let end = required_time(range.end.as_ref(), "selection.time_range.end")?;
            if end <= start {
                return Err(invalid_field(
                    "selection.time_range.end",
                    "must be after selection.time_range.start",
                ));
            }
            Range::Span { start, end }
        }
        None => {
            return Err(invalid_field(
                "selection.range",
                "give a period or a time_range",
            ));
        }
    };
    let format = match pb::ExportFormat::try_from(selection.format) {
        Ok(pb::ExportFormat::Csv) => Format::Csv,
        Ok(pb::ExportFormat::Jsonl) => Format::Jsonl,
        _ => return Err(invalid_field("selection.format", "must be CSV or JSONL")),
    };
    let watermark = |text: &str, field: &str| {
        (!text.is_empty())
            .then(|| Watermark::parse(text, field))
            .transpose()
            .map_err(invalid)
    };
    let time_zone = (!selection.time_zone.is_empty()).then(|| selection.time_zone.clone());
    if let Some(zone) = &time_zone
        && zone.parse::<chrono_tz::Tz>().is_err()
    {
        return Err(invalid_field(
            "selection.time_zone",
            "is not an IANA time zone name",
        ));
    }
    Ok(Selection {
        range,
        tenants,
        format,
        since: watermark(&selection.since_watermark, "selection.since_watermark")?,
        until: watermark(&selection.until_watermark, "selection.until_watermark")?,
        time_zone,
    })
}

fn states(numbers: &[i32]) -> Result<Vec<InvoiceState>, Status> {
    Ok(default_states(states_from_proto(numbers)?))
}

fn bucket(window: i32, default: Bucket) -> Result<Bucket, Status> {
    Ok(match pb::TimeBucket::try_from(window) {
        Ok(pb::TimeBucket::Unspecified) => default,
        Ok(pb::TimeBucket::None) => Bucket::Whole,
        Ok(pb::TimeBucket::Hour) => Bucket::Hour,
        Ok(pb::TimeBucket::Day) => Bucket::Day,
        Ok(pb::TimeBucket::Month) => Bucket::Month,
        Err(_) => return Err(invalid_field("window", "unknown value")),
    })
}

fn usage_rows(request: &pb::ExportUsageRequest) -> Result<Rows, Status> {
    let mut grouping = if request.group_by.is_empty() {
        UsageGrouping::ALL
    } else {
        UsageGrouping {
            agent: false,
            transaction: false,
            service: false,
            provider: false,
            model: false,
        }
    };
    for (i, number) in request.group_by.iter().enumerate() {
        match pb::UsageDimension::try_from(*number) {
            Ok(pb::UsageDimension::Agent) => grouping.agent = true,
            Ok(pb::UsageDimension::Transaction) => grouping.transaction = true,
            Ok(pb::UsageDimension::Service) => grouping.service = true,
            Ok(pb::UsageDimension::Provider) => grouping.provider = true,
            Ok(pb::UsageDimension::Model) => grouping.model = true,
            // Rows are always per tenant and carry every token class as a column.
            Ok(pb::UsageDimension::Tenant | pb::UsageDimension::TokenClass) => {}
            _ => {
                return Err(invalid_field(
                    &format!("group_by[{i}]"),
                    "must be a usage dimension",
                ));
            }
        }
    }
    let filter = request.filter.clone().unwrap_or_default();
    if !filter.token_classes.is_empty()
        || filter.has_transaction.is_some()
        || filter.unpriced.is_some()
    {
        return Err(invalid_field(
            "filter",
            "exports filter by agent, service, provider, model and transaction only",
        ));
    }
    Ok(Rows::Usage {
        raw_events: request.raw_events,
        bucket: bucket(request.window, Bucket::Hour)?,
        grouping,
        filters: Filters {
            agent_ids: filter.agent_ids,
            services: filter.services,
            providers: filter.providers,
            models: filter.models,
            transaction_ids: filter.transaction_ids,
        },
    })
}

fn attribution_rows(request: &pb::ExportAttributionRequest) -> Result<Rows, Status> {
    if !request.reporting_currency.is_empty() {
        return Err(Status::failed_precondition(
            "reporting_currency: no FX table is configured; rows are per currency",
        ));
    }
    let grouping = Grouping {
        tenant: true,
        ..attribution_grouping(&request.group_by)?
    };
    let filter = request.filter.clone().unwrap_or_default();
    Ok(Rows::Attribution {
        bucket: bucket(request.window, Bucket::Day)?,
        grouping,
        filters: Filters {
            agent_ids: filter.agent_ids,
            services: filter.services,
            providers: filter.providers,
            models: filter.models,
            transaction_ids: Vec::new(),
        },
    })
}

fn manifest_to_proto(manifest: Manifest) -> pb::ExportManifest {
    let kind = match Kind::parse(&manifest.kind) {
        Some(Kind::Invoices) => pb::ExportKind::Invoices,
        Some(Kind::InvoiceLines) => pb::ExportKind::InvoiceLines,
        Some(Kind::Usage) => pb::ExportKind::Usage,
        Some(Kind::Attribution) => pb::ExportKind::Attribution,
        Some(Kind::Transactions) => pb::ExportKind::Transactions,
        None => pb::ExportKind::Unspecified,
    };
    let format = match Format::parse(&manifest.format) {
        Some(Format::Csv) => pb::ExportFormat::Csv,
        Some(Format::Jsonl) => pb::ExportFormat::Jsonl,
        None => pb::ExportFormat::Unspecified,
    };
    let selection = &manifest.selection;
    let range = match (&selection.period, selection.start, selection.end) {
        (Some(period), _, _) => Some(pb::export_selection::Range::Period(period.clone())),
        (None, Some(start), Some(end)) => {
            Some(pb::export_selection::Range::TimeRange(pb::TimeRange {
                start: Some(timestamp(start)),
                end: Some(timestamp(end)),
            }))
        }
        _ => None,
    };
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    pb::ExportManifest {
        kind: kind as i32,
        format: format as i32,
        row_count: count(manifest.row_count),
        files: manifest
            .files
            .iter()
            .map(|f| pb::ExportFile {
                file_name: f.file_name.clone(),
                row_count: count(f.row_count),
                size_bytes: count(f.size_bytes),
                sha256: f.sha256.clone(),
            })
            .collect(),
        totals: manifest
            .totals
            .iter()
            .map(|t| pb::ExportTotal {
                currency: t.currency.clone(),
                column: t.column.clone(),
                amount: t.amount.to_string(),
            })
            .collect(),
        watermark: manifest.watermark.clone(),
        since_watermark: manifest.since_watermark.clone(),
        selection: Some(pb::ExportSelection {
            range,
            tenant_ids: selection.tenant_ids.clone(),
            format: format as i32,
            since_watermark: manifest.since_watermark.clone(),
            until_watermark: String::new(),
            time_zone: selection.time_zone.clone(),
        }),
        columns: manifest.columns,
        schema_version: manifest.schema_version,
        generated_at: Some(timestamp(manifest.generated_at)),
    }
}

#[tonic::async_trait]
impl ExportService for ExportApi {
    async fn export_invoices(
        &self,
        request: Request<pb::ExportInvoicesRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let rows = Rows::Invoices {
            states: states(&request.get_ref().states)?,
        };
        self.start(&request, request.get_ref().selection.as_ref(), rows)
    }

    async fn export_invoice_lines(
        &self,
        request: Request<pb::ExportInvoiceLinesRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let rows = Rows::InvoiceLines {
            states: states(&request.get_ref().states)?,
        };
        self.start(&request, request.get_ref().selection.as_ref(), rows)
    }

    async fn export_usage(
        &self,
        request: Request<pb::ExportUsageRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let rows = usage_rows(request.get_ref())?;
        self.start(&request, request.get_ref().selection.as_ref(), rows)
    }

    async fn export_attribution(
        &self,
        request: Request<pb::ExportAttributionRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let rows = attribution_rows(request.get_ref())?;
        self.start(&request, request.get_ref().selection.as_ref(), rows)
    }

    async fn export_transactions(
        &self,
        request: Request<pb::ExportTransactionsRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let rows = Rows::Transactions {
            lifecycle_events: request.get_ref().lifecycle_events,
        };
        self.start(&request, request.get_ref().selection.as_ref(), rows)
    }
}
