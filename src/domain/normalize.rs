//! Usage normalization: the `usage` of an event — disjoint buckets, or the raw usage object of
//! OpenAI Chat Completions / Responses, Anthropic Messages, Gemini or DashScope (Qwen) — into
//! validated, disjoint [`TokenCounts`]. The objects are the ones the providers' official SDKs
//! define; `src/ingest/codec/sdk_conformance.rs` checks this against fixtures those SDKs build.
//!
//! This is where double counting is stopped at the door. Providers nest their counts
//! differently (OpenAI and Gemini count cached tokens inside the prompt, Anthropic outside it;
//! reasoning is inside OpenAI's output but outside Gemini's candidates), so each shape has its
//! own rule, the one written on its message in `proto/tokenmeter/v1/usage.proto`. Every rule
//! *partitions* the provider's own counts, so Σ buckets equals the provider's billable total by
//! construction; a total the provider states is checked anyway. Whatever does not add up is a
//! [`FieldError`] naming the field, never a guess: a negative count, a subset larger than its
//! whole, a disagreeing total, an i64 overflow. Field paths start with the oneof field name
//! (`openai_chat.prompt_tokens_details.cached_tokens`).
//!
//! Decisions where the contract leaves room:
//! - Informational counts (OpenAI `text_tokens`, `accepted_prediction_tokens`,
//!   `rejected_prediction_tokens`; Anthropic `server_tool_use`) are rejected when negative but
//!   neither metered nor cross-checked: they overlap the buckets or are not tokens.
//! - OpenAI subsets are taken out of their whole in the order cached, cache writes, audio, image
//!   (reasoning, audio, image for output); when several do not fit together the error names the first that
//!   does not fit in what the earlier ones left: `exceeds prompt_tokens - cached_tokens (50 > 40)`.
//! - OpenAI `cached_tokens` and `audio_tokens` are treated as disjoint, as the proto formula
//!   says. Realtime models can count cached audio in both (with a `cached_tokens_details` the
//!   proto does not carry); for those the text/audio split would be off, Σ never is.
//! - Anthropic: a present `cache_creation` must split `cache_creation_input_tokens` exactly —
//!   also when it is an empty object — and the mismatch names `cache_creation_input_tokens`,
//!   the count the split is checked against, as a mismatched total names the total. Without
//!   `cache_creation` every cache write is a 5-minute one (the API's default TTL). The same
//!   rule holds for OpenAI Responses' `cache_write_tokens_details` (30-minute writes without
//!   it, the default retention) and for Qwen's `cache_creation`. Chat Completions writes are
//!   always 30-minute ones (the only retention Chat offers).
//! - Anthropic's `output_tokens_details.thinking_tokens` moves thinking from `output` to
//!   `reasoning`, as OpenAI's reasoning tokens are; Anthropic bills both at the output rate, so
//!   price books price `reasoning` like `output` for Anthropic models.
//! - DashScope does not say which modality its cache held; cached and written tokens are taken
//!   from the image tokens first (images lead a prompt). Σ is exact either way.
//! - Gemini modalities match the API's upper-case strings exactly ("AUDIO", "IMAGE"); any other
//!   string, lower-case ones included, is text. Beyond the proto formula — whose Σ is right
//!   whatever the details say — each details list must be a breakdown of its own count
//!   (AUDIO + IMAGE of `promptTokensDetails` ≤ `promptTokenCount`, of `cacheTokensDetails` ≤
//!   `cachedContentTokenCount`, …), `cachedContentTokenCount` ≤ `promptTokenCount` (documented
//!   subset), and the cache cannot hold more of a modality than the prompt and tool-use prompt
//!   had: otherwise tokens would silently move between classes priced differently.

use super::FieldError;
use super::tokens::TokenCounts;
use crate::proto::v1::{self as pb, usage_event::Usage};

const NEGATIVE: &str = "must not be negative";
const OVERFLOW: &str = "total token count overflows";

/// Normalizes an event's usage into disjoint buckets. Errors name the field relative to the
/// event's usage, e.g. `anthropic.cache_creation.ephemeral_1h_input_tokens`.
pub fn normalize(usage: &Usage) -> Result<TokenCounts, FieldError> {
    match usage {
        Usage::Tokens(tokens) => buckets(tokens).map_err(|e| e.within("tokens")),
        Usage::OpenaiChat(u) => openai_chat(u).map_err(|e| e.within("openai_chat")),
        Usage::OpenaiResponses(u) => openai_responses(u).map_err(|e| e.within("openai_responses")),
        Usage::Anthropic(u) => anthropic(u).map_err(|e| e.within("anthropic")),
        Usage::Gemini(u) => gemini(u).map_err(|e| e.within("gemini")),
        Usage::Dashscope(u) => dashscope(u).map_err(|e| e.within("dashscope")),
    }
}

/// The buckets the first release gave the same usage object, when they differ from `tokens`
/// (its normalization): it had no OpenAI cache-write classes and billed those writes as
/// uncached input (Qwen's too), and kept Anthropic's thinking inside output. An event stored
/// then and resent now must still be a DUPLICATE, so its payload is also compared this way.
pub fn first_release(usage: &Usage, tokens: &TokenCounts) -> Option<TokenCounts> {
    use super::tokens::TokenClass::*;
    let mut buckets = tokens.buckets();
    let moved: &[(super::tokens::TokenClass, super::tokens::TokenClass)] = match usage {
        Usage::OpenaiChat(_) => &[
            (CacheWrite30m, Input),
            (CacheWrite5m, Input),
            (CacheWrite1h, Input),
        ],
        Usage::OpenaiResponses(_) => &[(CacheWrite30m, Input), (CacheWrite12h, Input)],
        Usage::Anthropic(_) => &[(Reasoning, Output)],
        Usage::Tokens(_) | Usage::Gemini(_) | Usage::Dashscope(_) => &[],
    };
    for (from, to) in moved {
        // Cannot overflow: the sum of all buckets fits (checked when they were built).
        buckets[to.index()] += buckets[from.index()];
        buckets[from.index()] = 0;
    }
    TokenCounts::new(buckets).ok().filter(|old| old != tokens)
}

/// Already disjoint buckets; [`TokenCounts::new`] names the offending class.
pub fn buckets(t: &pb::TokenCounts) -> Result<TokenCounts, FieldError> {
    TokenCounts::new([
        t.input,
        t.cache_read,
        t.cache_write_5m,
        t.cache_write_1h,
        t.output,
        t.reasoning,
        t.input_audio,
        t.output_audio,
        t.input_image,
        t.output_image,
        t.cache_write_30m,
        t.cache_write_12h,
    ])
}

/// One side of an OpenAI-shaped usage object: a count and the details that are subsets of it,
/// taken out of it in this order.
struct Side<'a, const N: usize> {
    whole: (&'a str, i64),
    details: &'a str,
    parts: [(&'a str, i64); N],
}

fn openai_chat(u: &pb::OpenAiChatUsage) -> Result<TokenCounts, FieldError> {
    let no_details = pb::OpenAiPromptTokensDetails::default();
    let p = u.prompt_tokens_details.as_ref().unwrap_or(&no_details);
    let c = u.completion_tokens_details.unwrap_or_default();
    for (field, value) in [
        ("prompt_tokens_details.text_tokens", p.text_tokens),
        ("completion_tokens_details.text_tokens", c.text_tokens),
        (
            "completion_tokens_details.accepted_prediction_tokens",
            c.accepted_prediction_tokens,
        ),
        (
            "completion_tokens_details.rejected_prediction_tokens",
            c.rejected_prediction_tokens,
        ),
    ] {
        count(field, value)?;
    }
    let (
        text_in,
        [
            cache_read,
            cache_write_30m,
            creation,
            input_audio,
            input_image,
        ],
    ) = split(&Side {
        whole: ("prompt_tokens", u.prompt_tokens),
        details: "prompt_tokens_details",
        parts: [
            ("cached_tokens", p.cached_tokens),
            ("cache_write_tokens", p.cache_write_tokens),
            ("cache_creation_input_tokens", p.cache_creation_input_tokens),
            ("audio_tokens", p.audio_tokens),
            ("image_tokens", p.image_tokens),
        ],
    })?;
    let (cache_write_5m, cache_write_1h) = by_ttl(
        "prompt_tokens_details.",
        creation,
        p.cache_creation.as_ref(),
    )?;
    let (text_out, [reasoning, output_audio, output_image]) = split(&Side {
        whole: ("completion_tokens", u.completion_tokens),
        details: "completion_tokens_details",
        parts: [
            ("reasoning_tokens", c.reasoning_tokens),
            ("audio_tokens", c.audio_tokens),
            ("image_tokens", c.image_tokens),
        ],
    })?;
    sum(&[
        ("prompt_tokens", u.prompt_tokens),
        ("completion_tokens", u.completion_tokens),
    ])?;
    let counts = buckets(&pb::TokenCounts {
        input: text_in,
        cache_read,
        cache_write_5m,
        cache_write_1h,
        cache_write_30m,
        input_audio,
        input_image,
        output: text_out,
        reasoning,
        output_audio,
        output_image,
        ..Default::default()
    })?;
    check_total("total_tokens", u.total_tokens, &counts)?;
    Ok(counts)
}

fn openai_responses(u: &pb::OpenAiResponsesUsage) -> Result<TokenCounts, FieldError> {
    let i = u.input_tokens_details.unwrap_or_default();
    let o = u.output_tokens_details.unwrap_or_default();
    count("input_tokens_details.text_tokens", i.text_tokens)?;
    count("output_tokens_details.text_tokens", o.text_tokens)?;
    let (text_in, [cache_read, written, input_audio, input_image]) = split(&Side {
        whole: ("input_tokens", u.input_tokens),
        details: "input_tokens_details",
        parts: [
            ("cached_tokens", i.cached_tokens),
            ("cache_write_tokens", i.cache_write_tokens),
            ("audio_tokens", i.audio_tokens),
            ("image_tokens", i.image_tokens),
        ],
    })?;
    let (cache_write_30m, cache_write_12h) = match i.cache_write_tokens_details {
        None => (written, 0),
        Some(d) => {
            let details = "input_tokens_details.cache_write_tokens_details";
            let m30 = count(&format!("{details}.ttl_30m_tokens"), d.ttl_30m_tokens)?;
            let h12 = count(&format!("{details}.ttl_12h_tokens"), d.ttl_12h_tokens)?;
            exact_split(
                "input_tokens_details.cache_write_tokens",
                "cache_write_tokens_details",
                (m30, h12),
                written,
            )?
        }
    };
    let (text_out, [reasoning, output_audio, output_image]) = split(&Side {
        whole: ("output_tokens", u.output_tokens),
        details: "output_tokens_details",
        parts: [
            ("reasoning_tokens", o.reasoning_tokens),
            ("audio_tokens", o.audio_tokens),
            ("image_tokens", o.image_tokens),
        ],
    })?;
    sum(&[
        ("input_tokens", u.input_tokens),
        ("output_tokens", u.output_tokens),
    ])?;
    let counts = buckets(&pb::TokenCounts {
        input: text_in,
        cache_read,
        cache_write_30m,
        cache_write_12h,
        input_audio,
        input_image,
        output: text_out,
        reasoning,
        output_audio,
        output_image,
        ..Default::default()
    })?;
    check_total("total_tokens", u.total_tokens, &counts)?;
    Ok(counts)
}

/// `whole − Σ parts`, and the parts. Each part must fit in what the earlier ones left.
fn split<const N: usize>(side: &Side<'_, N>) -> Result<(i64, [i64; N]), FieldError> {
    let (whole_name, whole) = side.whole;
    let mut left = count(whole_name, whole)?;
    for (i, &(name, value)) in side.parts.iter().enumerate() {
        let field = || format!("{}.{name}", side.details);
        if value < 0 {
            return Err(FieldError::new(field(), NEGATIVE));
        }
        left = less(left, value).ok_or_else(|| {
            let taken: String = side.parts[..i]
                .iter()
                .filter(|(_, earlier)| *earlier != 0)
                .map(|(earlier, _)| format!(" - {earlier}"))
                .collect();
            exceeds(field(), value, &format!("{whole_name}{taken}"), left)
        })?;
    }
    Ok((left, side.parts.map(|(_, value)| value)))
}

/// Cache writes by TTL from Anthropic's `cache_creation` shape (also Qwen's): its 5-minute and
/// 1-hour counts, which must split `cache_creation_input_tokens` exactly when present; without
/// it every write is a 5-minute one (the default TTL). `prefix` locates the fields.
fn by_ttl(
    prefix: &str,
    written: i64,
    split: Option<&pb::AnthropicCacheCreation>,
) -> Result<(i64, i64), FieldError> {
    let Some(by_ttl) = split else {
        return Ok((written, 0));
    };
    let m5 = count(
        &format!("{prefix}cache_creation.ephemeral_5m_input_tokens"),
        by_ttl.ephemeral_5m_input_tokens,
    )?;
    let h1 = count(
        &format!("{prefix}cache_creation.ephemeral_1h_input_tokens"),
        by_ttl.ephemeral_1h_input_tokens,
    )?;
    exact_split(
        &format!("{prefix}cache_creation_input_tokens"),
        "cache_creation",
        (m5, h1),
        written,
    )
}

/// Two counts that must add up to `whole` exactly; the mismatch names the whole's `field`, the
/// count the split is checked against (as a mismatched total names the total).
fn exact_split(
    field: &str,
    split_name: &str,
    (a, b): (i64, i64),
    whole: i64,
) -> Result<(i64, i64), FieldError> {
    if a.checked_add(b) == Some(whole) {
        return Ok((a, b));
    }
    // Widened for the message only: the i64 sum may be the overflow being reported.
    let both = i128::from(a) + i128::from(b);
    let whole_name = field.rsplit('.').next().unwrap_or(field);
    Err(FieldError::new(
        field,
        format!("{split_name} splits into {a} + {b} = {both} but {whole_name} is {whole}"),
    ))
}

fn anthropic(u: &pb::AnthropicUsage) -> Result<TokenCounts, FieldError> {
    let input = count("input_tokens", u.input_tokens)?;
    let cache_read = count("cache_read_input_tokens", u.cache_read_input_tokens)?;
    let cache_creation = count("cache_creation_input_tokens", u.cache_creation_input_tokens)?;
    let output_tokens = count("output_tokens", u.output_tokens)?;
    if let Some(tools) = &u.server_tool_use {
        count(
            "server_tool_use.web_search_requests",
            tools.web_search_requests,
        )?;
        count(
            "server_tool_use.web_fetch_requests",
            tools.web_fetch_requests,
        )?;
    }
    let (cache_write_5m, cache_write_1h) = by_ttl("", cache_creation, u.cache_creation.as_ref())?;
    let thinking = u.output_tokens_details.map_or(0, |d| d.thinking_tokens);
    let (output, [reasoning]) = split(&Side {
        whole: ("output_tokens", output_tokens),
        details: "output_tokens_details",
        parts: [("thinking_tokens", thinking)],
    })?;
    // Anthropic states no total; its billable total is these four counts.
    sum(&[
        ("input_tokens", input),
        ("cache_read_input_tokens", cache_read),
        ("cache_creation_input_tokens", cache_creation),
        ("output_tokens", output_tokens),
    ])?;
    buckets(&pb::TokenCounts {
        input,
        cache_read,
        cache_write_5m,
        cache_write_1h,
        output,
        reasoning,
        ..Default::default()
    })
}

fn dashscope(u: &pb::DashScopeUsage) -> Result<TokenCounts, FieldError> {
    let no_details = pb::DashScopePromptTokensDetails::default();
    let p = u.prompt_tokens_details.as_ref().unwrap_or(&no_details);
    let i = u.input_tokens_details.unwrap_or_default();
    let o = u.output_tokens_details.unwrap_or_default();
    count("characters", u.characters)?;
    count("input_tokens_details.text_tokens", i.text_tokens)?;
    count("output_tokens_details.text_tokens", o.text_tokens)?;
    let cached = either(
        ("prompt_tokens_details.cached_tokens", p.cached_tokens),
        ("cached_tokens", u.cached_tokens),
    )?;
    let images = either(
        ("input_tokens_details.image_tokens", i.image_tokens),
        ("image_tokens", u.image_tokens),
    )?;
    let (uncached, [cache_read, creation]) = split(&Side {
        whole: ("input_tokens", u.input_tokens),
        details: "prompt_tokens_details",
        parts: [
            ("cached_tokens", cached),
            ("cache_creation_input_tokens", p.cache_creation_input_tokens),
        ],
    })?;
    if images > u.input_tokens {
        let field = if i.image_tokens != 0 {
            "input_tokens_details.image_tokens"
        } else {
            "image_tokens"
        };
        return Err(exceeds(field, images, "input_tokens", u.input_tokens));
    }
    let (cache_write_5m, cache_write_1h) = by_ttl(
        "prompt_tokens_details.",
        creation,
        p.cache_creation.as_ref(),
    )?;
    // Cached and written tokens are taken from the images first; cannot underflow, as
    // images ≤ input_tokens = uncached + cache_read + creation.
    let input_image = (images - cache_read - creation).max(0);
    let (output, [reasoning]) = split(&Side {
        whole: ("output_tokens", u.output_tokens),
        details: "output_tokens_details",
        parts: [("reasoning_tokens", o.reasoning_tokens)],
    })?;
    sum(&[
        ("input_tokens", u.input_tokens),
        ("output_tokens", u.output_tokens),
    ])?;
    let counts = buckets(&pb::TokenCounts {
        input: uncached - input_image,
        cache_read,
        cache_write_5m,
        cache_write_1h,
        input_image,
        output,
        reasoning,
        ..Default::default()
    })?;
    check_total("total_tokens", u.total_tokens, &counts)?;
    Ok(counts)
}

/// A count a provider reports in one of two places: whichever is set, and they must agree
/// when both are.
fn either(first: (&str, i64), second: (&str, i64)) -> Result<i64, FieldError> {
    let a = count(first.0, first.1)?;
    let b = count(second.0, second.1)?;
    match (a, b) {
        (0, b) => Ok(b),
        (a, 0) => Ok(a),
        (a, b) if a == b => Ok(a),
        (a, b) => Err(FieldError::new(
            second.0,
            format!("is {b} but {} is {a}", first.0),
        )),
    }
}

/// AUDIO and IMAGE tokens of one Gemini details list; the rest of its count is text.
#[derive(Debug, Clone, Copy, Default)]
struct Media {
    audio: i64,
    image: i64,
}

fn gemini(u: &pb::GeminiUsageMetadata) -> Result<TokenCounts, FieldError> {
    let prompt = count("prompt_token_count", u.prompt_token_count)?;
    let cached = count("cached_content_token_count", u.cached_content_token_count)?;
    let candidates = count("candidates_token_count", u.candidates_token_count)?;
    let tool_use = count("tool_use_prompt_token_count", u.tool_use_prompt_token_count)?;
    let thoughts = count("thoughts_token_count", u.thoughts_token_count)?;
    // The whole fits in i64, so every partial sum below does too.
    sum(&[
        ("prompt_token_count", prompt),
        ("tool_use_prompt_token_count", tool_use),
        ("candidates_token_count", candidates),
        ("thoughts_token_count", thoughts),
    ])?;
    let prompt_media = media("prompt_tokens_details", &u.prompt_tokens_details)?;
    let tool_media = media(
        "tool_use_prompt_tokens_details",
        &u.tool_use_prompt_tokens_details,
    )?;
    let cache_media = media("cache_tokens_details", &u.cache_tokens_details)?;
    let output_media = media("candidates_tokens_details", &u.candidates_tokens_details)?;

    if less(prompt, cached).is_none() {
        return Err(exceeds(
            "cached_content_token_count",
            cached,
            "prompt_token_count",
            prompt,
        ));
    }
    let prompt_text = text(
        ("prompt_token_count", prompt),
        "prompt_tokens_details",
        prompt_media,
    )?;
    let tool_text = text(
        ("tool_use_prompt_token_count", tool_use),
        "tool_use_prompt_tokens_details",
        tool_media,
    )?;
    let cache_text = text(
        ("cached_content_token_count", cached),
        "cache_tokens_details",
        cache_media,
    )?;
    let output = text(
        ("candidates_token_count", candidates),
        "candidates_tokens_details",
        output_media,
    )?;
    // Cached tokens leave the uncached class of their own modality: with the lines above this
    // is exactly the proto formula `input = prompt + tool_use − cache_read − audio − image`.
    let input_audio = uncached(
        "AUDIO",
        "cache_tokens_details",
        prompt_media.audio,
        tool_media.audio,
        cache_media.audio,
    )?;
    let input_image = uncached(
        "IMAGE",
        "cache_tokens_details",
        prompt_media.image,
        tool_media.image,
        cache_media.image,
    )?;
    let input = uncached(
        "text",
        "cached_content_token_count",
        prompt_text,
        tool_text,
        cache_text,
    )?;

    let counts = buckets(&pb::TokenCounts {
        input,
        cache_read: cached,
        input_audio,
        input_image,
        output,
        reasoning: thoughts,
        output_audio: output_media.audio,
        output_image: output_media.image,
        ..Default::default()
    })?;
    check_total("total_token_count", u.total_token_count, &counts)?;
    Ok(counts)
}

fn media(list: &str, entries: &[pb::GeminiModalityTokenCount]) -> Result<Media, FieldError> {
    let mut media = Media::default();
    for (i, entry) in entries.iter().enumerate() {
        let field = || format!("{list}[{i}].token_count");
        if entry.token_count < 0 {
            return Err(FieldError::new(field(), NEGATIVE));
        }
        let slot = match entry.modality.as_str() {
            "AUDIO" => &mut media.audio,
            "IMAGE" => &mut media.image,
            _ => continue,
        };
        *slot = slot.checked_add(entry.token_count).ok_or_else(|| {
            FieldError::new(field(), format!("{} tokens overflow", entry.modality))
        })?;
    }
    Ok(media)
}

/// The text part of a Gemini count: what its details list's AUDIO and IMAGE leave of it.
fn text(whole: (&str, i64), list: &str, media: Media) -> Result<i64, FieldError> {
    let (whole_name, whole) = whole;
    media
        .audio
        .checked_add(media.image)
        .and_then(|non_text| less(whole, non_text))
        .ok_or_else(|| {
            FieldError::new(
                list,
                format!(
                    "AUDIO + IMAGE tokens exceed {whole_name} ({} + {} > {whole})",
                    media.audio, media.image
                ),
            )
        })
}

/// One modality's uncached prompt tokens: what the prompt and tool-use prompt had of it, less
/// what of it the cache served.
fn uncached(
    modality: &str,
    field: &str,
    prompt: i64,
    tool: i64,
    cache: i64,
) -> Result<i64, FieldError> {
    let all = prompt.checked_add(tool);
    all.and_then(|all| less(all, cache)).ok_or_else(|| {
        let reason = format!(
            "{modality} tokens in cache exceed those of the prompt and tool-use prompt \
             ({cache} > {prompt} + {tool})"
        );
        FieldError::new(field, reason)
    })
}

/// A raw provider count.
fn count(field: &str, value: i64) -> Result<i64, FieldError> {
    if value < 0 {
        Err(FieldError::new(field, NEGATIVE))
    } else {
        Ok(value)
    }
}

/// `whole − part` when `part` fits in `whole`.
fn less(whole: i64, part: i64) -> Option<i64> {
    whole.checked_sub(part).filter(|left| *left >= 0)
}

fn exceeds(field: impl Into<String>, part: i64, whole_name: &str, whole: i64) -> FieldError {
    FieldError::new(field, format!("exceeds {whole_name} ({part} > {whole})"))
}

/// Σ of counts; an overflow names the field at which the sum leaves i64.
fn sum(counts: &[(&str, i64)]) -> Result<i64, FieldError> {
    counts.iter().try_fold(0_i64, |total, &(field, value)| {
        total
            .checked_add(value)
            .ok_or_else(|| FieldError::new(field, OVERFLOW))
    })
}

/// The provider's own total, when it states one, must be Σ buckets.
fn check_total(field: &str, stated: Option<i64>, counts: &TokenCounts) -> Result<(), FieldError> {
    match stated {
        Some(total) if total < 0 => Err(FieldError::new(field, NEGATIVE)),
        Some(total) if total != counts.total() => Err(FieldError::new(
            field,
            format!("buckets sum to {} but {field} is {total}", counts.total()),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::tokens::CLASS_COUNT;
    use crate::domain::tokens::TokenClass::{self, *};
    use crate::proto::v1::{
        AnthropicCacheCreation, AnthropicOutputTokensDetails, AnthropicServerToolUse,
        AnthropicUsage, DashScopeInputTokensDetails, DashScopeOutputTokensDetails,
        DashScopePromptTokensDetails, DashScopeUsage, GeminiModalityTokenCount,
        GeminiUsageMetadata, OpenAiCacheWriteTokensDetails, OpenAiChatUsage,
        OpenAiCompletionTokensDetails, OpenAiInputTokensDetails, OpenAiOutputTokensDetails,
        OpenAiPromptTokensDetails, OpenAiResponsesUsage,
    };

    fn non_zero(counts: &TokenCounts) -> Vec<(TokenClass, i64)> {
        counts.non_zero().collect()
    }

    fn error(usage: Usage) -> (String, String) {
        let error = normalize(&usage).expect_err("invalid usage");
        (error.field, error.reason)
    }

    fn modality(modality: &str, token_count: i64) -> GeminiModalityTokenCount {
        GeminiModalityTokenCount {
            modality: modality.to_owned(),
            token_count,
        }
    }

    // ---- real-shaped payloads ---------------------------------------------------------------

    #[test]
    fn tokens_pass_through_unchanged() {
        let usage = Usage::Tokens(pb::TokenCounts {
            input: 5,
            cache_write_1h: 7,
            ..Default::default()
        });

        let counts = normalize(&usage).expect("valid");

        assert_eq!(non_zero(&counts), [(Input, 5), (CacheWrite1h, 7)]);
    }

    #[test]
    fn openai_chat_takes_cached_prompt_and_reasoning_out_of_their_totals() {
        // o4-mini chat completion:
        // "usage": {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
        //   "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        //   "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0,
        //     "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
        let usage = Usage::OpenaiChat(OpenAiChatUsage {
            prompt_tokens: 2006,
            completion_tokens: 300,
            total_tokens: Some(2306),
            prompt_tokens_details: Some(OpenAiPromptTokensDetails {
                cached_tokens: 1920,
                ..Default::default()
            }),
            completion_tokens_details: Some(OpenAiCompletionTokensDetails {
                reasoning_tokens: 192,
                ..Default::default()
            }),
        });

        let counts = normalize(&usage).expect("valid");

        assert_eq!(
            non_zero(&counts),
            [
                (Input, 86),
                (CacheRead, 1920),
                (Output, 108),
                (Reasoning, 192)
            ]
        );
        assert_eq!(counts.total(), 2306);
    }

    #[test]
    fn openai_chat_without_details_is_all_text() {
        // gpt-3.5-turbo era, no details objects:
        // "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
        let usage = Usage::OpenaiChat(OpenAiChatUsage {
            prompt_tokens: 9,
            completion_tokens: 12,
            total_tokens: Some(21),
            ..Default::default()
        });

        let counts = normalize(&usage).expect("valid");

        assert_eq!(non_zero(&counts), [(Input, 9), (Output, 12)]);
        assert_eq!(counts.total(), 21);
    }

    #[test]
    fn openai_chat_audio_tokens_go_to_the_audio_classes() {
        // gpt-4o-audio-preview chat completion (audio in, audio + transcript out):
        // "usage": {"prompt_tokens": 93, "completion_tokens": 423, "total_tokens": 516,
        //   "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 76, "text_tokens": 17,
        //     "image_tokens": 0},
        //   "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 336,
        //     "text_tokens": 87, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
        let usage = Usage::OpenaiChat(OpenAiChatUsage {
            prompt_tokens: 93,
            completion_tokens: 423,
            total_tokens: Some(516),
            prompt_tokens_details: Some(OpenAiPromptTokensDetails {
                audio_tokens: 76,
                text_tokens: 17,
                ..Default::default()
            }),
            completion_tokens_details: Some(OpenAiCompletionTokensDetails {
                audio_tokens: 336,
                text_tokens: 87,
                ..Default::default()
            }),
        });

        let counts = normalize(&usage).expect("valid");

        assert_eq!(
            non_zero(&counts),
            [
                (Input, 17),
                (Output, 87),
                (InputAudio, 76),
                (OutputAudio, 336)
            ]
        );
        assert_eq!(counts.total(), 516);
    }

    #[test]
    fn openai_responses_takes_cached_input_and_reasoning_out_of_their_totals() {
        // o3 response:
        // "usage": {"input_tokens": 5120, "input_tokens_details": {"cached_tokens": 4864},
        //   "output_tokens": 1035, "output_tokens_details": {"reasoning_tokens": 832},
        //   "total_tokens": 6155}
        let usage = Usage::OpenaiResponses(OpenAiResponsesUsage {
            input_tokens: 5120,
            input_tokens_details: Some(OpenAiInputTokensDetails {
                cached_tokens: 4864,
                ..Default::default()
            }),
            output_tokens: 1035,
            output_tokens_details: Some(OpenAiOutputTokensDetails {
                reasoning_tokens: 832,
                ..Default::default()
            }),
            total_tokens: Some(6155),
        });

        let counts = normalize(&usage).expect("valid");

        assert_eq!(
            non_zero(&counts),
            [
                (Input, 256),
                (CacheRead, 4864),
                (Output, 203),
                (Reasoning, 832)
            ]
        );
        assert_eq!(counts.total(), 6155);
    }

    #[test]
    fn anthropic_cache_reads_and_writes_by_ttl_are_their_own_buckets() {
        // claude-sonnet-4-5 message with a 1h-cached system prompt and a 5m-cached tool list:
        // "usage": {"input_tokens": 12, "cache_creation_input_tokens": 2560,
        //   "cache_read_input_tokens": 1536, "output_tokens": 503,
        //   "cache_creation": {"ephemeral_5m_input_tokens": 512,
        //     "ephemeral_1h_input_tokens": 2048},
        //   "server_tool_use": {"web_search_requests": 1}, "service_tier": "standard"}
        let usage = Usage::Anthropic(AnthropicUsage {
            input_tokens: 12,
            cache_creation_input_tokens: 2560,
            cache_read_input_tokens: 1536,
            output_tokens: 503,
            cache_creation: Some(AnthropicCacheCreation {
                ephemeral_5m_input_tokens: 512,
                ephemeral_1h_input_tokens: 2048,
            }),
            server_tool_use: Some(AnthropicServerToolUse {
                web_search_requests: 1,
                web_fetch_requests: 0,
            }),
            service_tier: Some("standard".to_owned()),
            output_tokens_details: None,
        });

        let counts = normalize(&usage).expect("valid");

        assert_eq!(
            non_zero(&counts),
            [
                (Input, 12),
                (CacheRead, 1536),
                (CacheWrite5m, 512),
                (CacheWrite1h, 2048),
                (Output, 503)
            ]
        );
        // input + cache_read + cache_creation + output: cache tokens are outside input_tokens.
        assert_eq!(counts.total(), 12 + 1536 + 2560 + 503);
    }

    #[test]
    fn anthropic_cache_writes_without_a_ttl_split_are_5_minute_writes() {
        // Older API version, no `cache_creation` object:
        // "usage": {"input_tokens": 3, "cache_creation_input_tokens": 1800,
        //   "cache_read_input_tokens": 0, "output_tokens": 210}
        let usage = Usage::Anthropic(AnthropicUsage {
            input_tokens: 3,
            cache_creation_input_tokens: 1800,
            output_tokens: 210,
            ..Default::default()
        });

        let counts = normalize(&usage).expect("valid");

        assert_eq!(
            non_zero(&counts),
            [(Input, 3), (CacheWrite5m, 1800), (Output, 210)]
        );
        assert_eq!(counts.total(), 3 + 1800 + 210);
    }

    #[test]
    fn gemini_thoughts_cache_and_modalities_land_in_disjoint_buckets() {
        // gemini-2.5-pro, a prompt with 5 images and ~33 s of audio, partly served from an
        // explicit cache, one function-call round trip, thinking on:
        // "usageMetadata": {"promptTokenCount": 3354, "candidatesTokenCount": 412,
        //   "totalTokenCount": 4840, "cachedContentTokenCount": 2048,
        //   "toolUsePromptTokenCount": 150, "thoughtsTokenCount": 924,
        //   "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1012},
        //     {"modality": "IMAGE", "tokenCount": 1290},
        //     {"modality": "AUDIO", "tokenCount": 1052}],
        //   "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 760},
        //     {"modality": "IMAGE", "tokenCount": 1032}, {"modality": "AUDIO", "tokenCount": 256}],
        //   "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 412}],
        //   "toolUsePromptTokensDetails": [{"modality": "TEXT", "tokenCount": 150}]}
        let usage = Usage::Gemini(GeminiUsageMetadata {
            prompt_token_count: 3354,
            candidates_token_count: 412,
            total_token_count: Some(4840),
            cached_content_token_count: 2048,
            tool_use_prompt_token_count: 150,
            thoughts_token_count: 924,
            prompt_tokens_details: vec![
                modality("TEXT", 1012),
                modality("IMAGE", 1290),
                modality("AUDIO", 1052),
            ],
            cache_tokens_details: vec![
                modality("TEXT", 760),
                modality("IMAGE", 1032),
                modality("AUDIO", 256),
            ],
            candidates_tokens_details: vec![modality("TEXT", 412)],
            tool_use_prompt_tokens_details: vec![modality("TEXT", 150)],
        });

        let counts = normalize(&usage).expect("valid");

        assert_eq!(
            non_zero(&counts),
            [
                (Input, 1012 + 150 - 760),
                (CacheRead, 2048),
                (Output, 412),
                (Reasoning, 924),
                (InputAudio, 1052 - 256),
                (InputImage, 1290 - 1032),
            ]
        );
        // prompt + candidates + tool-use prompt + thoughts: thoughts are outside candidates.
        assert_eq!(counts.total(), 3354 + 412 + 150 + 924);
    }

    #[test]
    fn gemini_image_and_audio_output_go_to_the_output_media_classes() {
        // gemini-2.5-flash-image, one generated image plus a caption (audio added to cover
        // the AUDIO output class the same way native-audio models report it):
        // "usageMetadata": {"promptTokenCount": 14, "candidatesTokenCount": 1400,
        //   "totalTokenCount": 1414,
        //   "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 14}],
        //   "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290},
        //     {"modality": "TEXT", "tokenCount": 10}, {"modality": "AUDIO", "tokenCount": 100}]}
        let usage = Usage::Gemini(GeminiUsageMetadata {
            prompt_token_count: 14,
            candidates_token_count: 1400,
            total_token_count: Some(1414),
            prompt_tokens_details: vec![modality("TEXT", 14)],
            candidates_tokens_details: vec![
                modality("IMAGE", 1290),
                modality("TEXT", 10),
                modality("AUDIO", 100),
            ],
            ..Default::default()
        });

        let counts = normalize(&usage).expect("valid");

        assert_eq!(
            non_zero(&counts),
            [
                (Input, 14),
                (Output, 10),
                (OutputAudio, 100),
                (OutputImage, 1290)
            ]
        );
        assert_eq!(counts.total(), 1414);
    }

    #[test]
    fn gemini_modalities_other_than_audio_and_image_count_as_text() {
        // A PDF, a video clip, text and values the enum may grow (or a client lower-cased):
        // "promptTokensDetails": [{"modality": "DOCUMENT", "tokenCount": 258},
        //   {"modality": "VIDEO", "tokenCount": 500}, {"modality": "TEXT", "tokenCount": 20},
        //   {"modality": "MODALITY_UNSPECIFIED", "tokenCount": 1}, {"modality": "HOLOGRAM",
        //   "tokenCount": 2}, {"modality": "audio", "tokenCount": 3}]
        let usage = Usage::Gemini(GeminiUsageMetadata {
            prompt_token_count: 784,
            candidates_token_count: 16,
            total_token_count: Some(800),
            prompt_tokens_details: vec![
                modality("DOCUMENT", 258),
                modality("VIDEO", 500),
                modality("TEXT", 20),
                modality("MODALITY_UNSPECIFIED", 1),
                modality("HOLOGRAM", 2),
                modality("audio", 3),
            ],
            ..Default::default()
        });

        let counts = normalize(&usage).expect("valid");

        assert_eq!(non_zero(&counts), [(Input, 784), (Output, 16)]);
    }

    // ---- errors -----------------------------------------------------------------------------

    #[test]
    fn negative_buckets_are_rejected_naming_the_class() {
        let usage = Usage::Tokens(pb::TokenCounts {
            cache_read: -1,
            ..Default::default()
        });

        assert_eq!(
            error(usage),
            ("tokens.cache_read".into(), "must not be negative".into())
        );
    }

    #[test]
    fn negative_provider_counts_are_rejected_naming_the_field() {
        let cases = [
            (
                Usage::OpenaiChat(OpenAiChatUsage {
                    prompt_tokens: 100,
                    prompt_tokens_details: Some(OpenAiPromptTokensDetails {
                        cached_tokens: -1,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                "openai_chat.prompt_tokens_details.cached_tokens",
            ),
            (
                Usage::OpenaiChat(OpenAiChatUsage {
                    completion_tokens: -5,
                    ..Default::default()
                }),
                "openai_chat.completion_tokens",
            ),
            (
                Usage::OpenaiChat(OpenAiChatUsage {
                    completion_tokens_details: Some(OpenAiCompletionTokensDetails {
                        rejected_prediction_tokens: -1,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                "openai_chat.completion_tokens_details.rejected_prediction_tokens",
            ),
            (
                Usage::OpenaiChat(OpenAiChatUsage {
                    total_tokens: Some(-1),
                    ..Default::default()
                }),
                "openai_chat.total_tokens",
            ),
            (
                Usage::OpenaiResponses(OpenAiResponsesUsage {
                    output_tokens: 10,
                    output_tokens_details: Some(OpenAiOutputTokensDetails {
                        reasoning_tokens: -2,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                "openai_responses.output_tokens_details.reasoning_tokens",
            ),
            (
                Usage::Anthropic(AnthropicUsage {
                    cache_creation: Some(AnthropicCacheCreation {
                        ephemeral_5m_input_tokens: 0,
                        ephemeral_1h_input_tokens: -3,
                    }),
                    ..Default::default()
                }),
                "anthropic.cache_creation.ephemeral_1h_input_tokens",
            ),
            (
                Usage::Anthropic(AnthropicUsage {
                    server_tool_use: Some(AnthropicServerToolUse {
                        web_search_requests: -1,
                        web_fetch_requests: 0,
                    }),
                    ..Default::default()
                }),
                "anthropic.server_tool_use.web_search_requests",
            ),
            (
                Usage::Gemini(GeminiUsageMetadata {
                    thoughts_token_count: -7,
                    ..Default::default()
                }),
                "gemini.thoughts_token_count",
            ),
            (
                Usage::Gemini(GeminiUsageMetadata {
                    prompt_token_count: 10,
                    prompt_tokens_details: vec![modality("TEXT", 10), modality("VIDEO", -1)],
                    ..Default::default()
                }),
                "gemini.prompt_tokens_details[1].token_count",
            ),
        ];

        for (usage, field) in cases {
            assert_eq!(error(usage), (field.into(), "must not be negative".into()));
        }
    }

    #[test]
    fn cached_tokens_beyond_prompt_tokens_are_rejected_naming_the_subset() {
        let usage = Usage::OpenaiChat(OpenAiChatUsage {
            prompt_tokens: 100,
            prompt_tokens_details: Some(OpenAiPromptTokensDetails {
                cached_tokens: 120,
                ..Default::default()
            }),
            ..Default::default()
        });

        assert_eq!(
            error(usage),
            (
                "openai_chat.prompt_tokens_details.cached_tokens".into(),
                "exceeds prompt_tokens (120 > 100)".into()
            )
        );
    }

    #[test]
    fn subsets_that_do_not_fit_together_name_the_first_one_left_without_room() {
        let usage = Usage::OpenaiChat(OpenAiChatUsage {
            prompt_tokens: 100,
            prompt_tokens_details: Some(OpenAiPromptTokensDetails {
                cached_tokens: 60,
                audio_tokens: 50,
                ..Default::default()
            }),
            ..Default::default()
        });

        assert_eq!(
            error(usage),
            (
                "openai_chat.prompt_tokens_details.audio_tokens".into(),
                "exceeds prompt_tokens - cached_tokens (50 > 40)".into()
            )
        );
    }

    #[test]
    fn reasoning_beyond_output_tokens_is_rejected_naming_the_subset() {
        let usage = Usage::OpenaiResponses(OpenAiResponsesUsage {
            output_tokens: 300,
            output_tokens_details: Some(OpenAiOutputTokensDetails {
                reasoning_tokens: 301,
                ..Default::default()
            }),
            ..Default::default()
        });

        assert_eq!(
            error(usage),
            (
                "openai_responses.output_tokens_details.reasoning_tokens".into(),
                "exceeds output_tokens (301 > 300)".into()
            )
        );
    }

    #[test]
    fn a_total_that_disagrees_with_the_buckets_is_rejected_naming_the_total() {
        // The o4-mini payload above with total_tokens off by one.
        let chat = Usage::OpenaiChat(OpenAiChatUsage {
            prompt_tokens: 2006,
            completion_tokens: 300,
            total_tokens: Some(2307),
            prompt_tokens_details: Some(OpenAiPromptTokensDetails {
                cached_tokens: 1920,
                ..Default::default()
            }),
            completion_tokens_details: Some(OpenAiCompletionTokensDetails {
                reasoning_tokens: 192,
                ..Default::default()
            }),
        });
        // Cached tokens added to the total a second time: the classic double count.
        let responses = Usage::OpenaiResponses(OpenAiResponsesUsage {
            input_tokens: 5120,
            input_tokens_details: Some(OpenAiInputTokensDetails {
                cached_tokens: 4864,
                ..Default::default()
            }),
            output_tokens: 1035,
            total_tokens: Some(6155 + 4864),
            ..Default::default()
        });
        // Thoughts left out of the total, as if they were inside candidates.
        let gemini = Usage::Gemini(GeminiUsageMetadata {
            prompt_token_count: 9,
            candidates_token_count: 1371,
            thoughts_token_count: 865,
            total_token_count: Some(1380),
            ..Default::default()
        });

        assert_eq!(
            error(chat),
            (
                "openai_chat.total_tokens".into(),
                "buckets sum to 2306 but total_tokens is 2307".into()
            )
        );
        assert_eq!(
            error(responses),
            (
                "openai_responses.total_tokens".into(),
                "buckets sum to 6155 but total_tokens is 11019".into()
            )
        );
        assert_eq!(
            error(gemini),
            (
                "gemini.total_token_count".into(),
                "buckets sum to 2245 but total_token_count is 1380".into()
            )
        );
    }

    #[test]
    fn counts_that_overflow_i64_are_rejected_without_panicking() {
        let overflow = "total token count overflows".to_owned();
        let chat = Usage::OpenaiChat(OpenAiChatUsage {
            prompt_tokens: i64::MAX,
            completion_tokens: 1,
            ..Default::default()
        });
        let responses = Usage::OpenaiResponses(OpenAiResponsesUsage {
            input_tokens: i64::MAX - 1,
            output_tokens: 2,
            ..Default::default()
        });
        let anthropic = Usage::Anthropic(AnthropicUsage {
            input_tokens: i64::MAX / 2,
            cache_read_input_tokens: i64::MAX / 2,
            output_tokens: 2,
            ..Default::default()
        });
        let gemini = Usage::Gemini(GeminiUsageMetadata {
            prompt_token_count: i64::MAX,
            thoughts_token_count: 1,
            ..Default::default()
        });
        let gemini_details = Usage::Gemini(GeminiUsageMetadata {
            prompt_token_count: i64::MAX,
            prompt_tokens_details: vec![modality("AUDIO", i64::MAX), modality("AUDIO", 1)],
            ..Default::default()
        });
        let tokens = Usage::Tokens(pb::TokenCounts {
            input: i64::MAX,
            output_image: 1,
            ..Default::default()
        });

        assert_eq!(
            error(chat),
            ("openai_chat.completion_tokens".into(), overflow.clone())
        );
        assert_eq!(
            error(responses),
            ("openai_responses.output_tokens".into(), overflow.clone())
        );
        assert_eq!(
            error(anthropic),
            ("anthropic.output_tokens".into(), overflow.clone())
        );
        assert_eq!(
            error(gemini),
            ("gemini.thoughts_token_count".into(), overflow)
        );
        assert_eq!(
            error(gemini_details),
            (
                "gemini.prompt_tokens_details[1].token_count".into(),
                "AUDIO tokens overflow".into()
            )
        );
        assert_eq!(error(tokens).0, "tokens.output_image");
    }

    #[test]
    fn the_first_release_billed_cache_writes_as_input_and_thinking_as_output() {
        let responses = Usage::OpenaiResponses(OpenAiResponsesUsage {
            input_tokens: 5_000,
            input_tokens_details: Some(OpenAiInputTokensDetails {
                cached_tokens: 3_000,
                cache_write_tokens: 1_500,
                cache_write_tokens_details: Some(OpenAiCacheWriteTokensDetails {
                    ttl_30m_tokens: 1_000,
                    ttl_12h_tokens: 500,
                }),
                ..Default::default()
            }),
            output_tokens: 900,
            ..Default::default()
        });
        let thinking = Usage::Anthropic(AnthropicUsage {
            input_tokens: 10,
            output_tokens: 800,
            output_tokens_details: Some(AnthropicOutputTokensDetails {
                thinking_tokens: 600,
            }),
            ..Default::default()
        });
        let plain = Usage::Anthropic(AnthropicUsage {
            input_tokens: 10,
            output_tokens: 800,
            ..Default::default()
        });
        let old = |usage: &Usage| {
            let tokens = normalize(usage).expect("valid");
            first_release(usage, &tokens).map(|t| non_zero(&t))
        };

        // 500 uncached + 1,000 + 500 written = 2,000 input, as the first release stored it.
        assert_eq!(
            old(&responses),
            Some(vec![(Input, 2_000), (CacheRead, 3_000), (Output, 900)])
        );
        assert_eq!(old(&thinking), Some(vec![(Input, 10), (Output, 800)]));
        assert_eq!(old(&plain), None, "nothing moves: the same buckets as then");
    }

    #[test]
    fn cache_writes_and_thinking_that_do_not_add_up_are_rejected_naming_the_field() {
        let responses = |written, by_ttl: Option<(i64, i64)>| {
            Usage::OpenaiResponses(OpenAiResponsesUsage {
                input_tokens: 1000,
                input_tokens_details: Some(OpenAiInputTokensDetails {
                    cached_tokens: 600,
                    cache_write_tokens: written,
                    cache_write_tokens_details: by_ttl.map(|(m30, h12)| {
                        OpenAiCacheWriteTokensDetails {
                            ttl_30m_tokens: m30,
                            ttl_12h_tokens: h12,
                        }
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        let thinking = Usage::Anthropic(AnthropicUsage {
            output_tokens: 100,
            output_tokens_details: Some(AnthropicOutputTokensDetails {
                thinking_tokens: 101,
            }),
            ..Default::default()
        });
        let two_caches = Usage::Dashscope(DashScopeUsage {
            input_tokens: 1000,
            prompt_tokens_details: Some(DashScopePromptTokensDetails {
                cached_tokens: 500,
                ..Default::default()
            }),
            cached_tokens: 400,
            ..Default::default()
        });
        let images = Usage::Dashscope(DashScopeUsage {
            input_tokens: 1000,
            image_tokens: 1001,
            ..Default::default()
        });

        assert_eq!(
            error(responses(500, None)),
            (
                "openai_responses.input_tokens_details.cache_write_tokens".into(),
                "exceeds input_tokens - cached_tokens (500 > 400)".into()
            )
        );
        assert_eq!(
            error(responses(300, Some((200, 50)))),
            (
                "openai_responses.input_tokens_details.cache_write_tokens".into(),
                "cache_write_tokens_details splits into 200 + 50 = 250 but cache_write_tokens \
                 is 300"
                    .into()
            )
        );
        assert_eq!(
            error(responses(300, Some((-1, 301)))).0,
            "openai_responses.input_tokens_details.cache_write_tokens_details.ttl_30m_tokens"
        );
        assert_eq!(
            error(thinking),
            (
                "anthropic.output_tokens_details.thinking_tokens".into(),
                "exceeds output_tokens (101 > 100)".into()
            )
        );
        assert_eq!(
            error(two_caches),
            (
                "dashscope.cached_tokens".into(),
                "is 400 but prompt_tokens_details.cached_tokens is 500".into()
            )
        );
        assert_eq!(
            error(images),
            (
                "dashscope.image_tokens".into(),
                "exceeds input_tokens (1001 > 1000)".into()
            )
        );
    }

    #[test]
    fn anthropic_cache_creation_must_split_cache_creation_input_tokens_exactly() {
        let short = Usage::Anthropic(AnthropicUsage {
            cache_creation_input_tokens: 50,
            cache_creation: Some(AnthropicCacheCreation {
                ephemeral_5m_input_tokens: 30,
                ephemeral_1h_input_tokens: 10,
            }),
            ..Default::default()
        });
        let overflowing = Usage::Anthropic(AnthropicUsage {
            cache_creation_input_tokens: i64::MAX,
            cache_creation: Some(AnthropicCacheCreation {
                ephemeral_5m_input_tokens: i64::MAX,
                ephemeral_1h_input_tokens: 1,
            }),
            ..Default::default()
        });

        assert_eq!(
            error(short),
            (
                "anthropic.cache_creation_input_tokens".into(),
                "cache_creation splits into 30 + 10 = 40 but cache_creation_input_tokens is 50"
                    .into()
            )
        );
        assert_eq!(
            error(overflowing),
            (
                "anthropic.cache_creation_input_tokens".into(),
                format!(
                    "cache_creation splits into {} + 1 = 9223372036854775808 \
                     but cache_creation_input_tokens is {}",
                    i64::MAX,
                    i64::MAX
                )
            )
        );
    }

    #[test]
    fn gemini_counts_that_do_not_fit_their_whole_are_rejected_naming_the_subset() {
        let cached_beyond_prompt = Usage::Gemini(GeminiUsageMetadata {
            prompt_token_count: 100,
            tool_use_prompt_token_count: 50,
            cached_content_token_count: 120,
            ..Default::default()
        });
        let media_beyond_candidates = Usage::Gemini(GeminiUsageMetadata {
            candidates_token_count: 1000,
            candidates_tokens_details: vec![modality("IMAGE", 1290)],
            ..Default::default()
        });
        let cached_audio_beyond_prompt_audio = Usage::Gemini(GeminiUsageMetadata {
            prompt_token_count: 100,
            cached_content_token_count: 30,
            prompt_tokens_details: vec![modality("TEXT", 80), modality("AUDIO", 20)],
            cache_tokens_details: vec![modality("AUDIO", 30)],
            ..Default::default()
        });
        let cached_text_beyond_prompt_text = Usage::Gemini(GeminiUsageMetadata {
            prompt_token_count: 100,
            cached_content_token_count: 60,
            prompt_tokens_details: vec![modality("AUDIO", 100)],
            cache_tokens_details: vec![modality("TEXT", 60)],
            ..Default::default()
        });

        assert_eq!(
            error(cached_beyond_prompt),
            (
                "gemini.cached_content_token_count".into(),
                "exceeds prompt_token_count (120 > 100)".into()
            )
        );
        assert_eq!(
            error(media_beyond_candidates),
            (
                "gemini.candidates_tokens_details".into(),
                "AUDIO + IMAGE tokens exceed candidates_token_count (0 + 1290 > 1000)".into()
            )
        );
        assert_eq!(
            error(cached_audio_beyond_prompt_audio),
            (
                "gemini.cache_tokens_details".into(),
                "AUDIO tokens in cache exceed those of the prompt and tool-use prompt (30 > 20 + 0)"
                    .into()
            )
        );
        assert_eq!(
            error(cached_text_beyond_prompt_text),
            (
                "gemini.cached_content_token_count".into(),
                "text tokens in cache exceed those of the prompt and tool-use prompt (60 > 0 + 0)"
                    .into()
            )
        );
    }

    // ---- properties -------------------------------------------------------------------------

    /// Far beyond any real call, far enough below i64::MAX that sums of ten cannot overflow.
    const MAX: i64 = 1 << 40;

    /// A bucket, zero often enough to exercise absent details.
    fn bucket() -> impl Strategy<Value = i64> {
        prop_oneof![1 => Just(0_i64), 3 => 0..=MAX]
    }

    fn buckets_with(zero: &[TokenClass]) -> impl Strategy<Value = [i64; CLASS_COUNT]> {
        let zero = zero.to_vec();
        proptest::array::uniform12(bucket()).prop_map(move |mut b| {
            for class in &zero {
                b[class.index()] = 0;
            }
            b
        })
    }

    /// `permille` ‰ of `n`, rounded down: a way to cut a bucket in two without floats.
    fn share(n: i64, permille: i64) -> i64 {
        n * permille / 1000
    }

    proptest! {
        #[test]
        fn openai_chat_gives_back_the_buckets_it_was_built_from(
            b in buckets_with(&[CacheWrite1h, CacheWrite12h]),
            with_total in any::<bool>(),
        ) {
            // Chat's own cache writes are 30-minute ones; 5-minute writes come from Qwen's
            // compatible mode, with no TTL split (so none of 1 hour).
            let at = |class: TokenClass| b[class.index()];
            let prompt = at(Input) + at(CacheRead) + at(CacheWrite30m) + at(CacheWrite5m)
                + at(InputAudio) + at(InputImage);
            let completion = at(Output) + at(Reasoning) + at(OutputAudio) + at(OutputImage);
            let usage = Usage::OpenaiChat(OpenAiChatUsage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: with_total.then_some(prompt + completion),
                prompt_tokens_details: Some(OpenAiPromptTokensDetails {
                    cached_tokens: at(CacheRead),
                    cache_write_tokens: at(CacheWrite30m),
                    cache_creation_input_tokens: at(CacheWrite5m),
                    audio_tokens: at(InputAudio),
                    image_tokens: at(InputImage),
                    text_tokens: at(Input),
                    ..Default::default()
                }),
                completion_tokens_details: Some(OpenAiCompletionTokensDetails {
                    reasoning_tokens: at(Reasoning),
                    audio_tokens: at(OutputAudio),
                    image_tokens: at(OutputImage),
                    text_tokens: at(Output),
                    ..Default::default()
                }),
            });

            let counts = normalize(&usage).expect("consistent usage");

            prop_assert_eq!(counts.buckets(), b);
            prop_assert_eq!(counts.total(), prompt + completion);
        }

        #[test]
        fn openai_responses_gives_back_the_buckets_it_was_built_from(
            b in buckets_with(&[CacheWrite5m, CacheWrite1h]),
            with_total in any::<bool>(),
            with_ttl_split in any::<bool>(),
        ) {
            let mut b = b;
            if !with_ttl_split {
                b[CacheWrite12h.index()] = 0;
            }
            let at = |class: TokenClass| b[class.index()];
            let written = at(CacheWrite30m) + at(CacheWrite12h);
            let input = at(Input) + at(CacheRead) + written + at(InputAudio) + at(InputImage);
            let output = at(Output) + at(Reasoning) + at(OutputAudio) + at(OutputImage);
            let usage = Usage::OpenaiResponses(OpenAiResponsesUsage {
                input_tokens: input,
                input_tokens_details: Some(OpenAiInputTokensDetails {
                    cached_tokens: at(CacheRead),
                    cache_write_tokens: written,
                    cache_write_tokens_details: with_ttl_split.then_some(
                        OpenAiCacheWriteTokensDetails {
                            ttl_30m_tokens: at(CacheWrite30m),
                            ttl_12h_tokens: at(CacheWrite12h),
                        },
                    ),
                    audio_tokens: at(InputAudio),
                    image_tokens: at(InputImage),
                    text_tokens: at(Input),
                }),
                output_tokens: output,
                output_tokens_details: Some(OpenAiOutputTokensDetails {
                    reasoning_tokens: at(Reasoning),
                    audio_tokens: at(OutputAudio),
                    image_tokens: at(OutputImage),
                    text_tokens: at(Output),
                }),
                total_tokens: with_total.then_some(input + output),
            });

            let counts = normalize(&usage).expect("consistent usage");

            prop_assert_eq!(counts.buckets(), b);
            prop_assert_eq!(counts.total(), input + output);
        }

        #[test]
        fn anthropic_gives_back_the_buckets_it_was_built_from(
            b in buckets_with(&[
                InputAudio, OutputAudio, InputImage, OutputImage, CacheWrite30m, CacheWrite12h,
            ]),
            with_ttl_split in any::<bool>(),
        ) {
            let mut b = b;
            if !with_ttl_split {
                b[CacheWrite1h.index()] = 0;
            }
            let at = |class: TokenClass| b[class.index()];
            let usage = Usage::Anthropic(AnthropicUsage {
                input_tokens: at(Input),
                output_tokens: at(Output) + at(Reasoning),
                cache_creation_input_tokens: at(CacheWrite5m) + at(CacheWrite1h),
                cache_read_input_tokens: at(CacheRead),
                cache_creation: with_ttl_split.then_some(AnthropicCacheCreation {
                    ephemeral_5m_input_tokens: at(CacheWrite5m),
                    ephemeral_1h_input_tokens: at(CacheWrite1h),
                }),
                output_tokens_details: Some(AnthropicOutputTokensDetails {
                    thinking_tokens: at(Reasoning),
                }),
                ..Default::default()
            });

            let counts = normalize(&usage).expect("consistent usage");

            prop_assert_eq!(counts.buckets(), b);
            prop_assert_eq!(
                counts.total(),
                at(Input) + at(CacheRead) + at(CacheWrite5m) + at(CacheWrite1h) + at(Output)
                    + at(Reasoning)
            );
        }

        #[test]
        fn gemini_gives_back_the_buckets_it_was_built_from(
            b in buckets_with(&[CacheWrite5m, CacheWrite1h, CacheWrite30m, CacheWrite12h]),
            cut in proptest::array::uniform5(0..=1000_i64),
            with_total in any::<bool>(),
        ) {
            let at = |class: TokenClass| b[class.index()];
            // Where the cache_read tokens came from, by modality.
            let cached_audio = share(at(CacheRead), cut[0]);
            let cached_image = share(at(CacheRead) - cached_audio, cut[1]);
            let cached_text = at(CacheRead) - cached_audio - cached_image;
            // Which uncached prompt tokens came from tool-use results rather than the prompt.
            let tool_text = share(at(Input), cut[2]);
            let tool_audio = share(at(InputAudio), cut[3]);
            let tool_image = share(at(InputImage), cut[4]);
            let prompt_text = at(Input) - tool_text + cached_text;
            let prompt_audio = at(InputAudio) - tool_audio + cached_audio;
            let prompt_image = at(InputImage) - tool_image + cached_image;
            let prompt = prompt_text + prompt_audio + prompt_image;
            let tool_use = tool_text + tool_audio + tool_image;
            let candidates = at(Output) + at(OutputAudio) + at(OutputImage);
            let total = prompt + tool_use + candidates + at(Reasoning);
            let usage = Usage::Gemini(GeminiUsageMetadata {
                prompt_token_count: prompt,
                cached_content_token_count: at(CacheRead),
                candidates_token_count: candidates,
                tool_use_prompt_token_count: tool_use,
                thoughts_token_count: at(Reasoning),
                total_token_count: with_total.then_some(total),
                prompt_tokens_details: vec![
                    modality("TEXT", prompt_text),
                    modality("AUDIO", prompt_audio),
                    modality("IMAGE", prompt_image),
                ],
                cache_tokens_details: vec![
                    modality("TEXT", cached_text),
                    modality("AUDIO", cached_audio),
                    modality("IMAGE", cached_image),
                ],
                candidates_tokens_details: vec![
                    modality("TEXT", at(Output)),
                    modality("AUDIO", at(OutputAudio)),
                    modality("IMAGE", at(OutputImage)),
                ],
                tool_use_prompt_tokens_details: vec![
                    modality("TEXT", tool_text),
                    modality("AUDIO", tool_audio),
                    modality("IMAGE", tool_image),
                ],
            });

            let counts = normalize(&usage).expect("consistent usage");

            prop_assert_eq!(counts.buckets(), b);
            prop_assert_eq!(counts.total(), total);
        }

        #[test]
        fn dashscope_gives_back_the_buckets_it_was_built_from(
            b in buckets_with(&[
                InputAudio, OutputAudio, OutputImage, CacheWrite30m, CacheWrite12h,
            ]),
            cached_images in 0..=1000_i64,
            with_ttl_split in any::<bool>(),
            top_level in any::<bool>(),
        ) {
            let mut b = b;
            if !with_ttl_split {
                b[CacheWrite1h.index()] = 0;
            }
            let at = |class: TokenClass| b[class.index()];
            let cached_and_written = at(CacheRead) + at(CacheWrite5m) + at(CacheWrite1h);
            // Images are taken out of the cache first: uncached images exist only once the
            // cache holds nothing but images.
            let images = if at(InputImage) > 0 {
                at(InputImage) + cached_and_written
            } else {
                share(cached_and_written, cached_images)
            };
            let input = at(Input) + at(InputImage) + cached_and_written;
            let output = at(Output) + at(Reasoning);
            let usage = Usage::Dashscope(DashScopeUsage {
                input_tokens: input,
                output_tokens: output,
                total_tokens: Some(input + output),
                prompt_tokens_details: Some(DashScopePromptTokensDetails {
                    cached_tokens: if top_level { 0 } else { at(CacheRead) },
                    cache_creation_input_tokens: at(CacheWrite5m) + at(CacheWrite1h),
                    cache_creation: with_ttl_split.then_some(AnthropicCacheCreation {
                        ephemeral_5m_input_tokens: at(CacheWrite5m),
                        ephemeral_1h_input_tokens: at(CacheWrite1h),
                    }),
                    cache_type: Some("ephemeral".to_owned()),
                }),
                input_tokens_details: (!top_level).then_some(DashScopeInputTokensDetails {
                    text_tokens: input - images,
                    image_tokens: images,
                }),
                output_tokens_details: Some(DashScopeOutputTokensDetails {
                    reasoning_tokens: at(Reasoning),
                    text_tokens: at(Output),
                }),
                cached_tokens: if top_level { at(CacheRead) } else { 0 },
                image_tokens: if top_level { images } else { 0 },
                characters: 0,
            });

            let counts = normalize(&usage).expect("consistent usage");

            prop_assert_eq!(counts.buckets(), b);
            prop_assert_eq!(counts.total(), input + output);
        }
    }
}
