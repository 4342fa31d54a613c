//! InvoiceService: preview, read, finalize, void and close periods (see `billing`).

use std::sync::Arc;

use chrono::Utc;
use tonic::{Request, Response, Status};

use super::auth::{denied, principal};
use super::convert::{next_page_token, page_offset, page_size, timestamp};
use super::status::{from_store, invalid, invalid_field};
use crate::billing::{Billing, BillingError};
use crate::domain::auth::{Principal, Scope, TenantBinding};
use crate::domain::invoice::{InvoiceState, Line, LineKind};
use crate::domain::period::{BillingPeriod, PeriodLabel};
use crate::domain::tenant::RoundingMode;
use crate::proto::v1 as pb;
use crate::proto::v1::invoice_service_server::InvoiceService;
use crate::store::invoices::{InvoiceRecord, ListFilter};

pub struct InvoiceApi {
    billing: Arc<Billing>,
}

impl InvoiceApi {
    pub fn new(billing: Arc<Billing>) -> Self {
        Self { billing }
    }
}

fn from_billing(error: BillingError) -> Status {
    match error {
        BillingError::Store(e) => from_store(e),
        BillingError::Invalid(e) => invalid(e),
        BillingError::FailedPrecondition(reason) => Status::failed_precondition(reason),
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(invalid_field(field, "is required"))
    } else {
        Ok(value)
    }
}

/// Authorizes a call on one invoice of one tenant and checks both ids are given.
fn one_invoice<'a>(
    caller: &Principal,
    scope: Scope,
    tenant_id: &'a str,
    invoice_id: &'a str,
) -> Result<(&'a str, &'a str), Status> {
    caller.require(scope, [tenant_id]).map_err(denied)?;
    Ok((
        required(tenant_id, "tenant_id")?,
        required(invoice_id, "invoice_id")?,
    ))
}

fn label(text: &str, field: &str) -> Result<Option<PeriodLabel>, Status> {
    if text.is_empty() {
        return Ok(None);
    }
    PeriodLabel::parse(text, field).map(Some).map_err(invalid)
}

/// The tenants a request names, or every tenant the key is bound to (`None` = all).
fn tenants_of(caller: &Principal, named: &[String]) -> Option<Vec<String>> {
    if !named.is_empty() {
        return Some(named.to_vec());
    }
    match &caller.binding {
        TenantBinding::All => None,
        TenantBinding::Only(bound) => Some(bound.iter().cloned().collect()),
    }
}

/// The `states` filter of a request; each must be DRAFT, FINALIZED or VOID.
pub(crate) fn states_from_proto(numbers: &[i32]) -> Result<Vec<InvoiceState>, Status> {
    numbers
        .iter()
        .enumerate()
        .map(|(i, n)| match pb::InvoiceState::try_from(*n) {
            Ok(pb::InvoiceState::Draft) => Ok(InvoiceState::Draft),
            Ok(pb::InvoiceState::Finalized) => Ok(InvoiceState::Finalized),
            Ok(pb::InvoiceState::Void) => Ok(InvoiceState::Void),
            _ => Err(invalid_field(
                &format!("states[{i}]"),
                "must be an invoice state",
            )),
        })
        .collect()
}

fn state_to_proto(state: InvoiceState) -> pb::InvoiceState {
    match state {
        InvoiceState::Draft => pb::InvoiceState::Draft,
        InvoiceState::Finalized => pb::InvoiceState::Finalized,
        InvoiceState::Void => pb::InvoiceState::Void,
    }
}

fn rounding_to_proto(mode: RoundingMode) -> pb::RoundingMode {
    match mode {
        RoundingMode::HalfEven => pb::RoundingMode::HalfEven,
        RoundingMode::HalfUp => pb::RoundingMode::HalfUp,
        RoundingMode::HalfDown => pb::RoundingMode::HalfDown,
        RoundingMode::Up => pb::RoundingMode::Up,
        RoundingMode::Down => pb::RoundingMode::Down,
        RoundingMode::Ceiling => pb::RoundingMode::Ceiling,
        RoundingMode::Floor => pb::RoundingMode::Floor,
    }
}

fn period_to_proto(period: &BillingPeriod) -> pb::BillingPeriod {
    pb::BillingPeriod {
        label: period.label.to_string(),
        start: Some(timestamp(period.start)),
        end: Some(timestamp(period.end)),
    }
}

fn line_to_proto(invoice_id: &str, number: usize, line: &Line) -> pb::InvoiceLine {
    let kind = match line.kind {
        LineKind::Usage => pb::InvoiceLineKind::Usage,
        LineKind::Tier => pb::InvoiceLineKind::Tier,
        LineKind::Adjustment => pb::InvoiceLineKind::Adjustment,
        LineKind::Discount => pb::InvoiceLineKind::Discount,
        LineKind::Tax => pb::InvoiceLineKind::Tax,
    };
    let key = line.key.as_ref();
    pb::InvoiceLine {
        line_id: format!("{invoice_id}:{number}"),
        kind: kind as i32,
        description: line.description.clone(),
        provider: key.map(|k| k.provider.clone()).unwrap_or_default(),
        model: key.map(|k| k.model.clone()).unwrap_or_default(),
        token_class: key.map_or(0, |k| k.class as i32),
        quantity: line.quantity,
        unit_price: line.unit_price.to_string(),
        precise_amount: line.precise.to_plain_string(),
        amount: line.amount.to_string(),
        tier_from_tokens: line.tier.map(|t| t.0),
        tier_up_to_tokens: line.tier.and_then(|t| t.1),
        original_period: line.original_period.as_ref().map(period_to_proto),
        list_unit_price: line.list_unit_price.map(|d| d.to_string()),
        discount_percent: line.discount_percent.map(|d| d.to_string()),
        tax_rate_percent: line.tax_rate_percent.map(|d| d.to_string()),
        base_amount: line.base_amount.as_ref().map(|d| d.to_plain_string()),
        price_book_version_id: line.version_id.clone(),
        override_id: line.override_id.clone(),
    }
}

pub fn invoice_to_proto(invoice: &InvoiceRecord) -> pb::Invoice {
    pb::Invoice {
        invoice_id: invoice.invoice_id.clone(),
        tenant_id: invoice.tenant_id.clone(),
        state: state_to_proto(invoice.state) as i32,
        number: invoice.number.clone(),
        period: Some(period_to_proto(&invoice.period)),
        currency: invoice.currency.clone(),
        currency_exponent: i32::from(invoice.currency_exponent),
        rounding_mode: rounding_to_proto(invoice.rounding_mode) as i32,
        lines: invoice
            .lines
            .iter()
            .enumerate()
            .map(|(i, l)| line_to_proto(&invoice.invoice_id, i + 1, l))
            .collect(),
        line_count: invoice.line_count,
        subtotal: invoice.subtotal.to_string(),
        discount: invoice.discount.to_string(),
        tax: invoice.tax.to_string(),
        credit: invoice.credit.to_string(),
        total: invoice.total.to_string(),
        tax_rate_percent: invoice.tax_rate_percent.map(|d| d.to_string()),
        unpriced_event_count: invoice.unpriced_event_count,
        unpriced_tokens: invoice.unpriced_tokens,
        created_at: Some(timestamp(invoice.created_at)),
        computed_at: Some(timestamp(invoice.computed_at)),
        finalized_at: invoice.finalized_at.map(timestamp),
        voided_at: invoice.voided_at.map(timestamp),
        void_reason: invoice.void_reason.clone(),
        replacement_invoice_id: invoice.replacement_invoice_id.clone(),
        replaces_invoice_id: invoice.replaces_invoice_id.clone(),
    }
}

#[tonic::async_trait]
impl InvoiceService for InvoiceApi {
    async fn preview_invoice(
        &self,
        request: Request<pb::PreviewInvoiceRequest>,
    ) -> Result<Response<pb::PreviewInvoiceResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        caller
            .require(Scope::Read, [request.tenant_id.as_str()])
            .map_err(denied)?;
        let tenant_id = required(&request.tenant_id, "tenant_id")?;
        let period = label(&request.period, "period")?;
        let invoice = self
            .billing
            .preview(tenant_id, period, Utc::now())
            .await
            .map_err(from_billing)?;
        let wanted = request.currency.is_empty() || request.currency == invoice.currency;
        Ok(Response::new(pb::PreviewInvoiceResponse {
            invoices: if wanted {
                vec![invoice_to_proto(&invoice)]
            } else {
                Vec::new()
            },
        }))
    }

    async fn list_invoices(
        &self,
        request: Request<pb::ListInvoicesRequest>,
    ) -> Result<Response<pb::ListInvoicesResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        caller
            .require(Scope::Read, request.tenant_ids.iter().map(String::as_str))
            .map_err(denied)?;
        let states = states_from_proto(&request.states)?;
        let filter = ListFilter {
            tenant_ids: tenants_of(&caller, &request.tenant_ids),
            period_label: label(&request.period, "period")?.map(|l| l.to_string()),
            states,
            number: (!request.number.is_empty()).then(|| request.number.clone()),
            offset: page_offset(&request.page_token)?,
            limit: page_size(request.page_size)?,
        };
        let invoices = self
            .billing
            .list(&filter, request.include_lines)
            .await
            .map_err(from_billing)?;
        Ok(Response::new(pb::ListInvoicesResponse {
            next_page_token: next_page_token(filter.offset, invoices.len(), filter.limit),
            invoices: invoices.iter().map(invoice_to_proto).collect(),
        }))
    }

    async fn get_invoice(
        &self,
        request: Request<pb::GetInvoiceRequest>,
    ) -> Result<Response<pb::GetInvoiceResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        let (tenant_id, invoice_id) = one_invoice(
            &caller,
            Scope::Read,
            &request.tenant_id,
            &request.invoice_id,
        )?;
        let invoice = self
            .billing
            .get(tenant_id, invoice_id, Utc::now())
            .await
            .map_err(from_billing)?;
        Ok(Response::new(pb::GetInvoiceResponse {
            invoice: Some(invoice_to_proto(&invoice)),
        }))
    }

    async fn finalize_invoice(
        &self,
        request: Request<pb::FinalizeInvoiceRequest>,
    ) -> Result<Response<pb::FinalizeInvoiceResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        let (tenant_id, invoice_id) = one_invoice(
            &caller,
            Scope::Admin,
            &request.tenant_id,
            &request.invoice_id,
        )?;
        let invoice = self
            .billing
            .finalize(
                tenant_id,
                invoice_id,
                request.ignore_grace_period,
                Utc::now(),
            )
            .await
            .map_err(from_billing)?;
        Ok(Response::new(pb::FinalizeInvoiceResponse {
            invoice: Some(invoice_to_proto(&invoice)),
        }))
    }

    async fn void_invoice(
        &self,
        request: Request<pb::VoidInvoiceRequest>,
    ) -> Result<Response<pb::VoidInvoiceResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        let (tenant_id, invoice_id) = one_invoice(
            &caller,
            Scope::Admin,
            &request.tenant_id,
            &request.invoice_id,
        )?;
        let (voided, replacement) = self
            .billing
            .void(tenant_id, invoice_id, &request.reason, Utc::now())
            .await
            .map_err(from_billing)?;
        Ok(Response::new(pb::VoidInvoiceResponse {
            voided_invoice: Some(invoice_to_proto(&voided)),
            replacement_invoice: Some(invoice_to_proto(&replacement)),
        }))
    }

    async fn close_period(
        &self,
        request: Request<pb::ClosePeriodRequest>,
    ) -> Result<Response<pb::ClosePeriodResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        caller
            .require(Scope::Admin, request.tenant_ids.iter().map(String::as_str))
            .map_err(denied)?;
        let period = label(required(&request.period, "period")?, "period")?
            .ok_or_else(|| invalid_field("period", "is required"))?;
        let tenants = tenants_of(&caller, &request.tenant_ids);
        let report = self
            .billing
            .close_period(
                period,
                tenants.as_deref(),
                request.ignore_grace_period,
                request.dry_run,
                Utc::now(),
            )
            .await
            .map_err(from_billing)?;
        Ok(Response::new(pb::ClosePeriodResponse {
            tenants_considered: report.tenants_considered,
            invoices_finalized: report.invoices_finalized,
            invoices_already_final: report.invoices_already_final,
            failures: report
                .failures
                .into_iter()
                .map(|(tenant_id, reason)| pb::ClosePeriodFailure { tenant_id, reason })
                .collect(),
        }))
    }
}
