//! The local HTTP API (JSON, 127.0.0.1 only), protected by the token in `api.token`.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /v1/status` | node status (see README for every field) |
//! | `GET /v1/peers` | peers with state and last sync |
//! | `GET /v1/records/{collection}?after=ID&limit=N` | a page of a collection's live records, in id order (at most 1,000; `next` is the `after` of the next page, `null` at the end) |
//! | `GET /v1/records/{collection}/{id}` | one record; 404 if absent |
//! | `PUT /v1/records/{collection}/{id}` | set fields from a JSON object (`null` removes) |
//! | `DELETE /v1/records/{collection}/{id}` | mark deleted |
//! | `GET /v1/records/{collection}/{id}/automerge` | the record's Automerge document |
//! | `GET /v1/history` | sync sessions, newest first |
//! | `POST /v1/sync/now` | reconcile with every connected peer now |
//! | `POST /v1/sync/abort` | stop running syncs |
//! | `GET /v1/changes?collection=C` | follow record changes: one JSON line per change |
//! | `GET /v1/policy` | the org policy in force; 404 if none |
//! | `POST /v1/policy` | put a signed policy (the JSON `mesh policy sign` writes) in force |
//! | `GET /v1/quarantine` | changes the policy rejected, with why, and recent changes refused on arrival |
//!
//! Every request needs `Authorization: Bearer <token>`; without it the answer is 401.
//! Errors are `{"error": "..."}` with a 4xx or 5xx status.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use crdt_schema::{FieldEdit, RecordId};
use mesh_core::{Command, CommandError, Reply};
use serde_json::{Value, json};

use crate::driver::Handle;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The driver.
    pub node: Handle,
    /// The bearer token.
    pub token: String,
    /// Static facts about the node for status.
    pub info: NodeInfo,
}

/// Facts about the node that status reports beside the core's view.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// The API address.
    pub api_addr: String,
}

/// The API's routes.
/// Largest request body the API takes (a record's fields or a signed policy).
pub const BODY_BYTES_MAX: usize = 2 * 1024 * 1024;

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/peers/approve", post(approve_peer))
        .route("/v1/records/{collection}", get(list))
        .route(
            "/v1/records/{collection}/{id}",
            get(read).put(write).delete(delete),
        )
        .route("/v1/records/{collection}/{id}/automerge", get(export))
        .route("/v1/history", get(history))
        .route("/v1/sync/now", post(sync_now))
        .route("/v1/sync/abort", post(sync_abort))
        .route("/v1/changes", get(changes))
        .route("/v1/policy", get(show_policy).post(apply_policy))
        .route("/v1/quarantine", get(quarantine))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorise,
        ))
        .with_state(state)
}

/// What a client is told of a body over [`BODY_BYTES_MAX`] (the CLI says it before sending).
pub fn body_too_large() -> String {
    format!(
        "the body is larger than the API takes ({} MiB); store large values outside the record",
        BODY_BYTES_MAX / (1024 * 1024)
    )
}

/// Why a JSON body was refused: too large (413, with the limit), or not what was expected.
fn body_refused(rejection: &JsonRejection, not_valid: &str) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError(StatusCode::PAYLOAD_TOO_LARGE, body_too_large());
    }
    ApiError(
        StatusCode::BAD_REQUEST,
        format!("{not_valid}: {}", rejection.body_text()),
    )
}

/// An API error: a status and a message.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> ApiError {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("{error:#}"))
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> ApiError {
        let status = match &error {
            CommandError::NotFound(_) => StatusCode::NOT_FOUND,
            CommandError::Invalid(_) | CommandError::Schema { .. } => StatusCode::BAD_REQUEST,
            CommandError::PeerNotConnected(_) => StatusCode::CONFLICT,
            CommandError::Storage(_) => StatusCode::INSUFFICIENT_STORAGE,
            CommandError::Forbidden { .. } => StatusCode::FORBIDDEN,
            CommandError::Policy(_) => StatusCode::BAD_REQUEST,
        };
        ApiError(status, error.to_string())
    }
}

type ApiResult = Result<Response, ApiError>;

async fn authorise(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if presented.is_some_and(|token| constant_time_eq(token.as_bytes(), state.token.as_bytes())) {
        next.run(request).await
    } else {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API token: send `Authorization: Bearer <token>` with the token from api.token in the data directory".into(),
        )
        .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

async fn run(state: &ApiState, command: Command) -> Result<Reply, ApiError> {
    Ok(state.node.command(command).await??)
}

fn record_id(collection: &str, id: &str) -> Result<RecordId, ApiError> {
    RecordId::new(collection, id)
        .map_err(|error| ApiError(StatusCode::BAD_REQUEST, error.to_string()))
}

async fn status(State(state): State<ApiState>) -> ApiResult {
    let Reply::Status(status) = run(&state, Command::Status).await? else {
        return Err(unexpected());
    };
    let listen_addrs = state
        .node
        .listen_addrs
        .lock()
        .map(|addrs| addrs.clone())
        .unwrap_or_default();
    Ok(axum::Json(crate::replies::StatusReply {
        rejected_changes: status.counters.changes_rejected,
        status: *status,
        name: state.info.name.clone(),
        api_addr: state.info.api_addr.clone(),
        listen_addrs,
    })
    .into_response())
}

async fn peers(State(state): State<ApiState>) -> ApiResult {
    let Reply::Status(status) = run(&state, Command::Status).await? else {
        return Err(unexpected());
    };
    // Without a policy, refused keys are waiting for `mesh peers approve`.
    let pending = if status.policy.is_none() {
        status.refused_connections.clone()
    } else {
        Vec::new()
    };
    Ok(axum::Json(crate::replies::PeersReply {
        pending,
        open: status.open,
        peers: status.peers,
    })
    .into_response())
}

#[derive(serde::Deserialize)]
struct ApproveBody {
    peer: String,
}

async fn approve_peer(
    State(state): State<ApiState>,
    axum::Json(body): axum::Json<ApproveBody>,
) -> ApiResult {
    let peer: crdt_schema::NodeId =
        body.peer
            .parse()
            .map_err(|error: crdt_schema::identity::IdError| {
                ApiError(StatusCode::BAD_REQUEST, format!("`{}`: {error}", body.peer))
            })?;
    let Reply::PeerApproved {
        newly,
        policy_in_force,
    } = run(&state, Command::ApprovePeer { peer }).await?
    else {
        return Err(unexpected());
    };
    Ok(axum::Json(crate::replies::ApprovedReply {
        peer,
        newly,
        policy_in_force,
    })
    .into_response())
}

/// Which page of a collection's records a client wants.
#[derive(serde::Deserialize)]
struct ListQuery {
    /// Start after this record id.
    after: Option<String>,
    /// Most records in the page (at most 1,000, the default).
    #[serde(default)]
    limit: usize,
}

async fn list(
    State(state): State<ApiState>,
    Path(collection): Path<String>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    crdt_schema::record::check_collection(&collection)
        .map_err(|error| ApiError(StatusCode::BAD_REQUEST, error.to_string()))?;
    let axum::extract::Query(ListQuery { after, limit }) = query.map_err(|error| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "the page is asked as ?after=ID&limit=N: {}",
                error.body_text()
            ),
        )
    })?;
    let command = Command::List {
        collection,
        after,
        limit,
    };
    let Reply::Records { records, next } = run(&state, command).await? else {
        return Err(unexpected());
    };
    let records = records
        .iter()
        .map(crate::replies::RecordReply::from)
        .collect();
    Ok(axum::Json(crate::replies::RecordsReply { records, next }).into_response())
}

async fn read(
    State(state): State<ApiState>,
    Path((collection, id)): Path<(String, String)>,
) -> ApiResult {
    let record = record_id(&collection, &id)?;
    match run(
        &state,
        Command::Get {
            record: record.clone(),
        },
    )
    .await?
    {
        Reply::Record(Some(view)) => {
            Ok(axum::Json(crate::replies::RecordReply::from(&view)).into_response())
        }
        Reply::Record(None) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("record {record} does not exist"),
        )),
        _ => Err(unexpected()),
    }
}

async fn write(
    State(state): State<ApiState>,
    Path((collection, id)): Path<(String, String)>,
    body: Result<axum::Json<Value>, JsonRejection>,
) -> ApiResult {
    let record = record_id(&collection, &id)?;
    let axum::Json(body) =
        body.map_err(|rejection| body_refused(&rejection, "the body is not valid JSON"))?;
    let Value::Object(object) = body else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object of fields, like {\"count\": 3}".into(),
        ));
    };
    let mut fields = BTreeMap::new();
    for (name, value) in &object {
        let edit = FieldEdit::from_json(name, value)
            .map_err(|error| ApiError(StatusCode::BAD_REQUEST, error.to_string()))?;
        fields.insert(name.clone(), edit);
    }
    if fields.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "the body names no field to write".into(),
        ));
    }
    written(run(&state, Command::Put { record, fields }).await?)
}

async fn delete(
    State(state): State<ApiState>,
    Path((collection, id)): Path<(String, String)>,
) -> ApiResult {
    let record = record_id(&collection, &id)?;
    written(run(&state, Command::Delete { record }).await?)
}

fn written(reply: Reply) -> ApiResult {
    let Reply::Written {
        record,
        change,
        heads,
        changed,
    } = reply
    else {
        return Err(unexpected());
    };
    Ok(axum::Json(crate::replies::WrittenReply {
        record: record.to_string(),
        change: change.map(|hash| hash.to_string()),
        heads: heads.iter().map(ToString::to_string).collect(),
        changed,
    })
    .into_response())
}

async fn export(
    State(state): State<ApiState>,
    Path((collection, id)): Path<(String, String)>,
) -> ApiResult {
    let record = record_id(&collection, &id)?;
    let Reply::Document(bytes) = run(&state, Command::Export { record }).await? else {
        return Err(unexpected());
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn history(State(state): State<ApiState>) -> ApiResult {
    let Reply::History(rows) = run(&state, Command::History).await? else {
        return Err(unexpected());
    };
    Ok(axum::Json(crate::replies::HistoryReply { history: rows }).into_response())
}

/// Options of `POST /v1/sync/now`.
#[derive(serde::Deserialize, Default)]
struct SyncNowBody {
    /// Only this peer (its node id).
    peer: Option<String>,
}

async fn sync_now(
    State(state): State<ApiState>,
    body: Option<axum::Json<SyncNowBody>>,
) -> ApiResult {
    let body = body.map(|axum::Json(body)| body).unwrap_or_default();
    let peer = match body.peer {
        Some(text) => Some(
            text.parse()
                .map_err(|error: crdt_schema::identity::IdError| {
                    ApiError(StatusCode::BAD_REQUEST, error.to_string())
                })?,
        ),
        None => None,
    };
    let Reply::SyncStarted { peers } = run(&state, Command::SyncNow { peer }).await? else {
        return Err(unexpected());
    };
    Ok(axum::Json(json!({ "peers": peers })).into_response())
}

async fn sync_abort(State(state): State<ApiState>) -> ApiResult {
    let Reply::SyncAborted { sessions } = run(&state, Command::SyncAbort).await? else {
        return Err(unexpected());
    };
    Ok(axum::Json(json!({ "sessions": sessions })).into_response())
}

async fn show_policy(State(state): State<ApiState>) -> ApiResult {
    let Reply::Policy(view) = run(&state, Command::ShowPolicy).await? else {
        return Err(unexpected());
    };
    match view {
        Some(view) => Ok(axum::Json(view).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            "no policy is in force: every node key may connect and write; apply one with `mesh policy apply FILE`".into(),
        )),
    }
}

async fn apply_policy(
    State(state): State<ApiState>,
    body: Result<axum::Json<crdt_schema::policy::SignedPolicy>, JsonRejection>,
) -> ApiResult {
    let axum::Json(signed) = body.map_err(|rejection| {
        body_refused(
            &rejection,
            "the body is not a signed policy as `mesh policy sign` writes it",
        )
    })?;
    let Reply::PolicyOffered(offer) = run(&state, Command::ApplyPolicy { signed }).await? else {
        return Err(unexpected());
    };
    Ok(axum::Json(offer).into_response())
}

async fn quarantine(State(state): State<ApiState>) -> ApiResult {
    let Reply::Quarantine { held, refused } = run(&state, Command::Quarantine).await? else {
        return Err(unexpected());
    };
    Ok(axum::Json(crate::replies::QuarantineReply {
        quarantine: held,
        refused,
    })
    .into_response())
}

/// Which changes a follower wants.
#[derive(serde::Deserialize)]
struct ChangesQuery {
    collection: Option<String>,
}

/// Streams record changes as JSON lines until the client goes away. A follower that falls
/// more than the feed's buffer behind gets a `{"lagged": n}` line and carries on.
async fn changes(
    State(state): State<ApiState>,
    axum::extract::Query(query): axum::extract::Query<ChangesQuery>,
) -> Response {
    let receiver = state.node.feed.subscribe();
    let prefix = query.collection.map(|collection| format!("{collection}/"));
    let stream =
        futures_util::stream::unfold((receiver, prefix), |(mut receiver, prefix)| async move {
            loop {
                let line = match receiver.recv().await {
                    Ok(event)
                        if prefix
                            .as_ref()
                            .is_none_or(|prefix| event.record.starts_with(prefix.as_str())) =>
                    {
                        serde_json::to_string(&event).expect("events serialise")
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        json!({ "lagged": missed }).to_string()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                };
                return Some((
                    Ok::<_, std::convert::Infallible>(format!("{line}\n")),
                    (receiver, prefix),
                ));
            }
        });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

fn unexpected() -> ApiError {
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the node answered a different question".into(),
    )
}
