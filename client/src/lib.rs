//! powerinfer-client: the typed async client of powerinferd's gRPC API
//! (`powerinfer.v1`), and the `pictl` command line built on it.
//!
//! Depends on the wire contract (`powerinfer-proto`) only, never on the daemon: what a
//! client can do is exactly what the API offers.
//!
//! ```no_run
//! # async fn demo() -> Result<(), powerinfer_client::ClientError> {
//! use powerinfer_client::{Client, GenerateEvent, text_request};
//! use tokio_stream::StreamExt;
//!
//! let client = Client::connect("127.0.0.1:50051").await?;
//! let mut stream = client.generate(text_request("smollm2-135m", "The capital of France is")).await?;
//! while let Some(event) = stream.next().await {
//!     match event? {
//!         GenerateEvent::Token(t) => print!("{}", t.text),
//!         GenerateEvent::Final(f) => println!("{}", f.text),
//!     }
//! }
//! # Ok(())
//! # }
//! ```

pub mod cli;

use std::pin::Pin;
use std::time::Duration;

pub use powerinfer_proto::v1 as proto;
use proto::control_service_client::ControlServiceClient;
use proto::inference_service_client::InferenceServiceClient;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint};
pub use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The daemon's default address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";
/// How long `connect` tries before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },
    #[error("cannot connect to powerinferd at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The server answered with an error.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the stream ended without a final message")]
    Truncated,
    #[error("the API key has characters a header cannot carry")]
    InvalidApiKey,
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "ok",
        C::Cancelled => "cancelled",
        C::Unknown => "unknown error",
        C::InvalidArgument => "invalid argument",
        C::DeadlineExceeded => "deadline exceeded",
        C::NotFound => "not found",
        C::AlreadyExists => "already exists",
        C::PermissionDenied => "permission denied",
        C::ResourceExhausted => "resource exhausted",
        C::FailedPrecondition => "failed precondition",
        C::Aborted => "aborted",
        C::OutOfRange => "out of range",
        C::Unimplemented => "unimplemented",
        C::Internal => "internal error",
        C::Unavailable => "unavailable",
        C::DataLoss => "data loss",
        C::Unauthenticated => "unauthenticated",
    }
}

impl ClientError {
    /// The gRPC code of a server error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// One item of a generation stream.
#[derive(Clone, Debug, PartialEq)]
pub enum GenerateEvent {
    Token(proto::Token),
    Final(proto::Final),
}

pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, ClientError>> + Send>>;
pub type PullStream =
    Pin<Box<dyn Stream<Item = Result<proto::PullModelResponse, ClientError>> + Send>>;
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<proto::watch_models_response::Event, ClientError>> + Send>>;

/// A whole generation, collected.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<proto::Token>,
    pub summary: proto::Final,
}

/// A request to continue `prompt` (special-token text is parsed).
pub fn text_request(model: &str, prompt: &str) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: model.to_owned(),
        input: Some(proto::generate_request::Input::Prompt(prompt.to_owned())),
        ..Default::default()
    }
}

/// A request to answer `messages` (rendered with the model's chat template).
pub fn chat_request(model: &str, messages: &[(&str, &str)]) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: model.to_owned(),
        input: Some(proto::generate_request::Input::Chat(proto::ChatMessages {
            messages: messages
                .iter()
                .map(|(role, content)| proto::ChatMessage {
                    role: (*role).to_owned(),
                    content: (*content).to_owned(),
                })
                .collect(),
        })),
        ..Default::default()
    }
}

/// Greedy sampling (temperature 0).
pub fn greedy() -> proto::SamplingParams {
    proto::SamplingParams {
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// A connection to one daemon; cheap to clone (clones share the connection).
#[derive(Clone, Debug)]
pub struct Client {
    inference: InferenceServiceClient<Channel>,
    control: ControlServiceClient<Channel>,
    health: HealthClient<Channel>,
    /// `Bearer KEY`, sent with every call when set.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    /// Connects to `addr` (`HOST:PORT`, or an `http://` URI).
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let uri = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri).map_err(|e| ClientError::InvalidAddress {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        Ok(Self::from_channel(channel))
    }

    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inference: InferenceServiceClient::new(channel.clone()),
            control: ControlServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
            authorization: None,
        }
    }

    /// Sends `key` (`authorization: Bearer KEY`) with every call, as a daemon with API
    /// keys requires.
    pub fn with_api_key(mut self, key: &str) -> Result<Self, ClientError> {
        let value = format!("Bearer {}", key.trim())
            .parse()
            .map_err(|_| ClientError::InvalidApiKey)?;
        self.authorization = Some(value);
        Ok(self)
    }

    /// `message` as a request carrying the key, if there is one.
    fn req<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        if let Some(a) = &self.authorization {
            r.metadata_mut().insert("authorization", a.clone());
        }
        r
    }

    /// Starts a generation. Dropping the stream cancels it on the server.
    pub async fn generate(
        &self,
        request: proto::GenerateRequest,
    ) -> Result<GenerateStream, ClientError> {
        let stream = self
            .inference
            .clone()
            .generate(self.req(request))
            .await?
            .into_inner();
        let events = stream.filter_map(|item| match item {
            Ok(proto::GenerateResponse { event: Some(e) }) => Some(Ok(match e {
                proto::generate_response::Event::Token(t) => GenerateEvent::Token(t),
                proto::generate_response::Event::Final(f) => GenerateEvent::Final(f),
            })),
            // An empty message carries nothing (a newer server's unknown event).
            Ok(proto::GenerateResponse { event: None }) => None,
            Err(s) => Some(Err(ClientError::Status(s))),
        });
        Ok(Box::pin(events))
    }

    /// Runs a generation to its end and returns the text, the tokens and the summary.
    pub async fn generate_all(
        &self,
        request: proto::GenerateRequest,
    ) -> Result<Generation, ClientError> {
        let mut stream = self.generate(request).await?;
        let mut out = Generation::default();
        while let Some(event) = stream.next().await {
            match event? {
                GenerateEvent::Token(t) => {
                    out.text.push_str(&t.text);
                    out.tokens.push(t);
                }
                GenerateEvent::Final(f) => {
                    out.text.push_str(&f.text);
                    out.summary = f;
                    return Ok(out);
                }
            }
        }
        Err(ClientError::Truncated)
    }

    pub async fn tokenize(
        &self,
        request: proto::TokenizeRequest,
    ) -> Result<proto::TokenizeResponse, ClientError> {
        Ok(self
            .inference
            .clone()
            .tokenize(self.req(request))
            .await?
            .into_inner())
    }

    pub async fn detokenize(
        &self,
        request: proto::DetokenizeRequest,
    ) -> Result<String, ClientError> {
        Ok(self
            .inference
            .clone()
            .detokenize(self.req(request))
            .await?
            .into_inner()
            .text)
    }

    pub async fn load(
        &self,
        request: proto::LoadModelRequest,
    ) -> Result<proto::ModelInfo, ClientError> {
        let r = self
            .control
            .clone()
            .load_model(self.req(request))
            .await?
            .into_inner();
        r.model.ok_or_else(|| {
            ClientError::Status(tonic::Status::internal("LoadModel returned no model"))
        })
    }

    pub async fn unload(&self, model: &str) -> Result<(), ClientError> {
        self.control
            .clone()
            .unload_model(self.req(proto::UnloadModelRequest {
                model: model.to_owned(),
            }))
            .await?;
        Ok(())
    }

    pub async fn list(&self) -> Result<proto::ListModelsResponse, ClientError> {
        Ok(self
            .control
            .clone()
            .list_models(self.req(proto::ListModelsRequest {}))
            .await?
            .into_inner())
    }

    pub async fn status(&self) -> Result<proto::StatusResponse, ClientError> {
        Ok(self
            .control
            .clone()
            .status(self.req(proto::StatusRequest {}))
            .await?
            .into_inner())
    }

    /// Load, unload and progress events from now on.
    /// Fetches a catalog model into the daemon's models directory, streaming its
    /// progress; the last item has `done` set.
    pub async fn pull(&self, model: &str) -> Result<PullStream, ClientError> {
        let stream = self
            .control
            .clone()
            .pull_model(self.req(proto::PullModelRequest {
                model: model.to_owned(),
            }))
            .await?
            .into_inner();
        Ok(Box::pin(
            stream.map(|item| item.map_err(ClientError::Status)),
        ))
    }

    pub async fn watch(&self) -> Result<WatchStream, ClientError> {
        let stream = self
            .control
            .clone()
            .watch_models(self.req(proto::WatchModelsRequest {}))
            .await?
            .into_inner();
        Ok(Box::pin(stream.filter_map(|item| match item {
            Ok(proto::WatchModelsResponse { event: Some(e) }) => Some(Ok(e)),
            Ok(proto::WatchModelsResponse { event: None }) => None,
            Err(s) => Some(Err(ClientError::Status(s))),
        })))
    }

    /// The `grpc.health.v1` status of `service` (a model name; "" for the server).
    pub async fn health(&self, service: &str) -> Result<ServingStatus, ClientError> {
        let r = self
            .health
            .clone()
            .check(self.req(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            }))
            .await?
            .into_inner();
        Ok(ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown))
    }
}
