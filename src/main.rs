//! `kiln`: the command line over the library. Results go to stdout; progress and statistics
//! to stderr.

use clap::{Args, Parser, Subcommand};
use kiln::engine::EngineConfig;
use kiln::model::lora::{self, AdapterSpec};
use kiln::sampling::SamplingParams;
use kiln::speculative::Speculator;
use kiln::tokenizer::ChatMessage;
use kiln::{GenerateParams, Gpu, Model, Session};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Run Llama, Mistral, Qwen2/3 and mixture-of-experts models on any GPU through WebGPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt; prints only the generated text on stdout.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        speculative: SpeculativeArgs,
    },
    /// Chat through the model's chat template, one user line at a time from stdin.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// A system message to open the conversation.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        speculative: SpeculativeArgs,
    },
    /// Perplexity of a text file, over consecutive windows of --ctx tokens.
    Perplexity {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        file: PathBuf,
    },
    /// An OpenAI-compatible HTTP server on the batched engine (chat page at /).
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// The model name clients see (default: the model file's or directory's name).
        #[arg(long)]
        served_model_name: Option<String>,
        /// GPU memory for the KV cache pool, e.g. 512M or 2G (default: as much as the weights
        /// take, between 256 MiB and 4 GiB).
        #[arg(long, value_parser = parse_bytes)]
        kv_memory: Option<u64>,
        /// Most sequences decoding together.
        #[arg(long, default_value_t = 64)]
        max_running: usize,
        /// Most requests waiting to start; more get 503.
        #[arg(long, default_value_t = 256)]
        max_waiting: usize,
        /// Most tokens one engine step computes (decode tokens plus prompt chunks).
        #[arg(long, default_value_t = 256)]
        max_step_tokens: usize,
        /// Largest request body, e.g. 1M; larger ones get 413.
        #[arg(long, value_parser = parse_bytes, default_value = "1M")]
        max_body: u64,
        /// Seconds running streams may take to finish after SIGINT/SIGTERM.
        #[arg(long, default_value_t = 30)]
        shutdown_timeout: u64,
        /// Speculative decoding by prompt lookup for greedy requests: each step drafts up to
        /// --draft-tokens tokens per sequence from its own prompt and output, checked in the same
        /// batched step (the output is unchanged; acceptance in /metrics).
        #[arg(long)]
        lookup: bool,
        /// Most tokens drafted per sequence and step with --lookup.
        #[arg(long, default_value_t = 4, requires = "lookup")]
        draft_tokens: usize,
        /// With --lookup, drafts fill a step only up to this many tokens in all (default: 12 on
        /// CPU adapters, 64 on GPUs: past it, checking drafts costs the batch more than it saves).
        #[arg(long, requires = "lookup")]
        lookup_step_tokens: Option<usize>,
    },
    /// Architecture, sizes, memory and the adapter.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// GPU memory for the batched engine's KV cache pool, e.g. 512M or 2G (default: as much
        /// as the weights take, between 256 MiB and 4 GiB).
        #[arg(long, value_parser = parse_bytes)]
        kv_memory: Option<u64>,
    },
    /// Prefill and decode speed, time to first token, GPU time per op, and decode bandwidth
    /// against the device's copy bandwidth, measured in one run.
    Bench {
        /// A model directory, .gguf file or hub repo id.
        #[arg(long, conflicts_with = "synthetic", required_unless_present = "synthetic")]
        model: Option<PathBuf>,
        /// A synthetic model with random weights made on the device: smollm2-135m-q4_1,
        /// qwen2.5-0.5b-q4_k, qwen2.5-0.5b-q8_0, llama3-8b-q4_0, llama3-8b-f16, qwen3-30b-a3b-q4_k.
        #[arg(long)]
        synthetic: Option<String>,
        /// Keep only the first N layers of a synthetic model (a big preset on a small machine).
        #[arg(long, requires = "synthetic")]
        layers: Option<usize>,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 32)]
        gen_tokens: usize,
        /// KV-cache fills at which to measure decoding.
        #[arg(long, value_delimiter = ',', default_value = "0,512,2048")]
        fills: Vec<usize>,
        /// Skip the op-by-op profile of a prefill step.
        #[arg(long)]
        no_prefill_profile: bool,
        /// Serve this many concurrent greedy streams through the batched engine and report
        /// aggregate decode speed, time to first token and inter-token latency (e.g. 1,4,16,64).
        #[arg(long, value_delimiter = ',')]
        concurrency: Vec<usize>,
        /// Prompt tokens of each concurrent stream.
        #[arg(long, default_value_t = 32)]
        stream_prompt_tokens: usize,
        /// Measure the time to first token of two requests sharing a prefix of this many tokens
        /// (the second served from the prefix cache).
        #[arg(long, default_value_t = 0)]
        shared_prefix: usize,
        /// Measure speculative decoding by prompt lookup against plain decoding, on code, rewrite
        /// and chat prompts (greedy; the tokens are checked to be the same).
        #[arg(long)]
        lookup: bool,
        /// Also measure speculative decoding with this draft model (implies --lookup).
        #[arg(long)]
        draft: Option<PathBuf>,
        /// Fixed numbers of drafted tokens per step to measure besides the adaptive choice.
        #[arg(long, value_delimiter = ',', default_value = "2,4,6")]
        draft_tokens: Vec<usize>,
        /// LoRA adapters applied to every measured sequence (the cost of unmerged adapters).
        #[arg(long = "lora", value_name = "PATH[:SCALE]")]
        lora: Vec<AdapterSpec>,
        /// Also draw the results as charts into this .svg or .png file.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// One JSON object on stdout instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Check every kernel a model uses on this adapter and driver against the CPU reference, at the
    /// model's shapes and with its own weights: pass or fail, worst error against its bound, speed.
    /// Exits non-zero if any check fails.
    Doctor {
        /// A model directory, .gguf file or hub repo id.
        #[arg(long, conflicts_with = "synthetic", required_unless_present = "synthetic")]
        model: Option<PathBuf>,
        /// A synthetic model made on the device (as for `kiln bench`).
        #[arg(long)]
        synthetic: Option<String>,
        /// One JSON object on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Fold LoRA adapters into a Hugging Face model directory and write the merged model
    /// (W + scale·B·A, rounded once to the base's dtype) as a new directory.
    MergeLora {
        /// The base model: a Hugging Face directory of f32, f16 or bf16 safetensors.
        #[arg(long)]
        model: PathBuf,
        /// An adapter and its scale (default 1); repeat to fold in several.
        #[arg(long = "lora", value_name = "PATH[:SCALE]", required = true)]
        lora: Vec<AdapterSpec>,
        /// The directory to write; it must not exist (unless --force) and never is an input.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out directory.
        #[arg(long)]
        force: bool,
    },
    /// Attention maps: each chosen head's attention probabilities over the prompt, as one PNG of
    /// heatmaps per layer and the numbers as JSON.
    Attention {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        /// Layers to draw (default: the first and the last).
        #[arg(long, value_delimiter = ',')]
        layers: Vec<usize>,
        /// Query heads to draw: `all` or a list such as 0,3,7.
        #[arg(long, default_value = "all")]
        heads: String,
        /// Directory for layer-N.png and attention.json (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model directory (config.json, model.safetensors, tokenizer.json, ...).
    #[arg(long)]
    model: PathBuf,
    /// Context length (KV cache positions); default: the model's, at most 4096.
    #[arg(long)]
    ctx: Option<usize>,
    /// A LoRA adapter directory (PEFT format), its scale after a colon (default 1); repeat for
    /// several. Kept unmerged: generate, chat and perplexity apply them all; `serve` lets each
    /// request choose one as the model `NAME:ADAPTER` (the adapter's directory name).
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    lora: Vec<AdapterSpec>,
}

/// Speculative decoding: tokens proposed cheaply, checked by the model several at a time; greedy
/// output is unchanged, sampling keeps the model's distribution.
#[derive(Args)]
struct SpeculativeArgs {
    /// A draft model (directory, .gguf or hub id) sharing --model's vocabulary proposes tokens.
    #[arg(long, conflicts_with = "lookup")]
    draft: Option<PathBuf>,
    /// Prompt lookup proposes tokens: what followed the latest earlier match of the text's last
    /// words in the prompt and output (no second model).
    #[arg(long)]
    lookup: bool,
    /// Most tokens proposed per step; fewer (down to none) while proposals are rejected.
    #[arg(long, default_value_t = 5)]
    draft_tokens: usize,
}

impl SpeculativeArgs {
    /// The draft model, loaded on the target's device.
    fn load_draft(&self, target: &Model) -> kiln::Result<Option<Model>> {
        self.draft.as_ref().map(|path| Model::load(path, target.gpu.clone(), &mut |_, _| {})).transpose()
    }

    fn speculator<'m>(
        &self,
        draft: Option<&'m Model>,
        target: &Model,
        ctx: usize,
    ) -> kiln::Result<Option<Speculator<'m>>> {
        match draft {
            Some(draft) => Ok(Some(Speculator::with_model(draft, target, ctx, self.draft_tokens)?)),
            None if self.lookup => Ok(Some(Speculator::lookup(self.draft_tokens)?)),
            None => Ok(None),
        }
    }
}

/// Generate with the speculator when there is one.
fn generate<'m>(
    session: &mut Session<'m>,
    speculator: &mut Option<Speculator<'m>>,
    ids: &[u32],
    params: &GenerateParams,
) -> kiln::Result<kiln::Generation> {
    let g = match speculator {
        Some(s) => s.generate(session, ids, params, stream_to_stdout)?,
        None => session.generate(ids, params, stream_to_stdout)?,
    };
    println!();
    print_stats(&g);
    if let Some(s) = speculator {
        eprintln!(
            "speculative: {} of {} drafted tokens accepted ({:.0}%), {:.2} tokens per step",
            s.stats.accepted,
            s.stats.drafted,
            100.0 * s.stats.acceptance(),
            (s.stats.steps + s.stats.accepted) as f64 / s.stats.steps.max(1) as f64
        );
    }
    Ok(g)
}

#[derive(Args)]
struct SamplingArgs {
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy. Default: generation_config.json's when it samples, else greedy.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long)]
    repeat_penalty: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    /// Flags first, then generation_config.json (when it asks to sample), then greedy.
    fn params(&self, model: &Model) -> GenerateParams {
        let g = &model.generation;
        let sample = g.do_sample;
        let pick = |flag: Option<f32>, default: Option<f32>, off: f32| {
            flag.or(if sample { default } else { None }).unwrap_or(off)
        };
        let sampling = SamplingParams {
            temperature: pick(self.temperature, g.temperature.or(Some(1.0)), 0.0),
            top_k: self.top_k.or(if sample { g.top_k } else { None }).unwrap_or(0),
            top_p: pick(self.top_p, g.top_p, 1.0),
            min_p: pick(self.min_p, g.min_p, 0.0),
            repeat_penalty: pick(self.repeat_penalty, g.repetition_penalty, 1.0),
            seed: self.seed,
            ..Default::default()
        };
        GenerateParams { max_tokens: self.max_tokens, sampling, stop_at_eos: true }
    }
}

/// A byte count: a number with an optional K, M, G or T suffix (powers of 1024), e.g. 512M.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit() && *c != '.') {
        Some((i, _)) => (&s[..i], s[i..].trim().trim_end_matches(['B', 'b', 'i'])),
        None => (s, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        other => return Err(format!("unknown unit `{other}` (use K, M, G or T)")),
    };
    let value: f64 = digits.parse().map_err(|_| format!("`{s}` is not a byte count such as 512M or 2G"))?;
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("`{s}` must be more than 0 bytes"));
    }
    Ok((value * (1u64 << shift) as f64) as u64)
}

fn load(args: &ModelArgs) -> kiln::Result<Model> {
    let gpu = Gpu::new()?;
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} ({bytes_per_sec})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    let mut model = Model::load(&args.model, gpu, &mut |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    })?;
    if !args.lora.is_empty() {
        model.add_adapters(&args.lora)?;
        for (name, rank, scale) in &model.weights.lora.list {
            eprintln!("adapter {name}: rank {rank}, scale {scale}");
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let s = &model.load_stats;
    eprintln!(
        "loaded {} in {:.2} s ({:.1} MiB of weights; peak RSS {}) on {}",
        args.model.display(),
        s.seconds,
        s.weight_bytes as f64 / 1048576.0,
        s.peak_rss_bytes.map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
        model.gpu.describe()
    );
    Ok(model)
}

fn print_stats(g: &kiln::Generation) {
    eprintln!(
        "\nprompt tokens: {}, prefill: {:.1} tok/s, generated: {} tokens, decode: {:.1} tok/s ({:?})",
        g.prompt_tokens,
        g.prefill_tokens_per_second(),
        g.tokens.len(),
        g.decode_tokens_per_second(),
        g.stop
    );
}

fn stream_to_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn run(cli: Cli) -> kiln::Result<()> {
    match cli.command {
        Command::Generate { model: args, prompt, sampling, speculative } => {
            if prompt.is_empty() {
                return Err(kiln::KilnError::Request("the prompt is empty".into()));
            }
            let model = load(&args)?;
            let params = sampling.params(&model);
            params.sampling.validate()?;
            let draft = speculative.load_draft(&model)?;
            let ids = model.tokenizer.encode(&prompt, true)?;
            let mut session = Session::new(&model, args.ctx)?;
            session.set_adapters(model.weights.lora.all())?;
            let mut speculator = speculative.speculator(draft.as_ref(), &model, session.context())?;
            generate(&mut session, &mut speculator, &ids, &params)?;
        }
        Command::Chat { model: args, system, sampling, speculative } => {
            let model = load(&args)?;
            let params = sampling.params(&model);
            params.sampling.validate()?;
            let draft = speculative.load_draft(&model)?;
            let mut session = Session::new(&model, args.ctx)?;
            session.set_adapters(model.weights.lora.all())?;
            let mut speculator = speculative.speculator(draft.as_ref(), &model, session.context())?;
            let mut messages: Vec<ChatMessage> =
                system.into_iter().map(|s| ChatMessage { role: "system".into(), content: s }).collect();
            let stdin = std::io::stdin();
            let interactive = stdin.is_terminal();
            loop {
                if interactive {
                    eprint!("> ");
                }
                let mut line = String::new();
                if stdin.lock().read_line(&mut line).map_err(|e| kiln::KilnError::io("stdin", e))? == 0 {
                    break;
                }
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    continue;
                }
                messages.push(ChatMessage { role: "user".into(), content: line.to_string() });
                let ids = model.tokenizer.encode_chat(&messages, true)?;
                // Keep what the cache already holds of this conversation; feed only the rest.
                let common = session.keep_common_prefix(&ids);
                let budget = params.max_tokens.min(session.context().saturating_sub(ids.len()));
                if budget == 0 {
                    return Err(kiln::KilnError::Request(format!(
                        "the conversation ({} tokens) fills the context of {}",
                        ids.len(),
                        session.context()
                    )));
                }
                let turn = GenerateParams { max_tokens: budget, ..params.clone() };
                let g = generate(&mut session, &mut speculator, &ids[common..], &turn)?;
                messages.push(ChatMessage { role: "assistant".into(), content: g.text.clone() });
            }
        }
        Command::Perplexity { model: args, file } => {
            let model = load(&args)?;
            let text = std::fs::read_to_string(&file).map_err(|e| kiln::KilnError::io(&file, e))?;
            let ids = model.tokenizer.encode(&text, true)?;
            if ids.len() < 2 {
                return Err(kiln::KilnError::Request(format!("{} has fewer than 2 tokens", file.display())));
            }
            let mut session = Session::new(&model, args.ctx)?;
            session.set_adapters(model.weights.lora.all())?;
            let window = session.context();
            let vocab = model.config.vocab_size;
            let (mut nll, mut count) = (0f64, 0usize);
            for chunk in ids.chunks(window) {
                if chunk.len() < 2 {
                    continue;
                }
                session.rollback(0);
                let logits = session.feed_all(chunk)?;
                for i in 0..chunk.len() - 1 {
                    let row = &logits[i * vocab..(i + 1) * vocab];
                    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
                    nll += lse - row[chunk[i + 1] as usize] as f64;
                    count += 1;
                }
                eprint!("\r{count} tokens, running perplexity {:.4}", (nll / count as f64).exp());
            }
            eprintln!();
            println!("perplexity: {:.4}", (nll / count as f64).exp());
            println!("tokens: {count}");
        }
        Command::Serve {
            model: args,
            host,
            port,
            served_model_name,
            kv_memory,
            max_running,
            max_waiting,
            max_step_tokens,
            max_body,
            shutdown_timeout,
            lookup,
            draft_tokens,
            lookup_step_tokens,
        } => {
            let options = kiln::server::ServeOptions {
                host,
                port,
                model_name: served_model_name,
                engine: EngineConfig {
                    kv_memory,
                    max_running,
                    max_waiting,
                    max_step_tokens,
                    max_context: args.ctx,
                    lookup_draft_tokens: if lookup { draft_tokens } else { 0 },
                    lookup_step_tokens,
                    ..Default::default()
                },
                max_body_bytes: max_body.min(usize::MAX as u64) as usize,
                shutdown_timeout: std::time::Duration::from_secs(shutdown_timeout),
            };
            kiln::server::run(options, move || load(&args))?;
        }
        Command::Doctor { model, synthetic, json } => {
            let model = match (model, synthetic) {
                (Some(path), _) => load(&ModelArgs { model: path, ctx: None, lora: Vec::new() })?,
                (None, Some(name)) => Model::synthetic(&name, Some(1), Gpu::new()?, 0)?,
                (None, None) => unreachable!("clap requires --model or --synthetic"),
            };
            eprintln!("doctor: {}", model.gpu.describe());
            let report = kiln::doctor::run(&model, |check| eprintln!("doctor: {check}"))?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            if !report.passed() {
                return Err(kiln::KilnError::Request("some kernels computed wrong results on this device".into()));
            }
        }
        Command::MergeLora { model, lora: specs, out, force } => {
            if model.is_file() {
                return Err(kiln::KilnError::Request(format!(
                    "{} is a GGUF file: merge-lora writes Hugging Face directories (merge into the safetensors, then convert)",
                    model.display()
                )));
            }
            let config = kiln::model::ModelConfig::from_file(&model.join("config.json"))?;
            let adapters: Vec<lora::Adapter> =
                specs.iter().map(|s| lora::Adapter::read(s, &config)).collect::<kiln::Result<_>>()?;
            let changed = lora::merge(&model, &adapters, &out, force)?;
            eprintln!("merged {} adapter(s) into {changed} matrices: {}", adapters.len(), out.display());
        }
        Command::Attention { model: args, prompt, layers, heads, out } => {
            attention(&args, &prompt, layers, &heads, &out)?
        }
        Command::Info { model: args, kv_memory } => {
            let model = load(&args)?;
            print!("{}", model.info());
            let config = EngineConfig { kv_memory, max_context: args.ctx, ..Default::default() };
            let pool = config.kv_pool(&model)?;
            println!(
                "engine kv pool: {} blocks of {} positions = {} tokens, {} bytes ({:.3} GiB)",
                pool.blocks,
                pool.block_size,
                pool.tokens,
                pool.bytes,
                pool.bytes as f64 / (1u64 << 30) as f64
            );
        }
        Command::Bench {
            model,
            synthetic,
            layers,
            prompt_tokens,
            gen_tokens,
            fills,
            no_prefill_profile,
            concurrency,
            stream_prompt_tokens,
            shared_prefix,
            lookup,
            draft,
            draft_tokens,
            lora,
            plot,
            json,
        } => {
            let mut model = match (model, synthetic) {
                (Some(path), _) => load(&ModelArgs { model: path, ctx: None, lora: Vec::new() })?,
                (None, Some(name)) => {
                    eprintln!("making synthetic model {name} on the device");
                    let m = Model::synthetic(&name, layers, Gpu::new()?, 0)?;
                    eprintln!(
                        "made {:.1} MiB of weights in {:.2} s",
                        m.load_stats.weight_bytes as f64 / 1048576.0,
                        m.load_stats.seconds
                    );
                    m
                }
                (None, None) => unreachable!("clap requires --model or --synthetic"),
            };
            if !lora.is_empty() {
                model.add_adapters(&lora)?;
                eprintln!("every measured sequence applies {} LoRA adapter(s)", lora.len());
            }
            if let Some(path) = &plot {
                let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
                if !matches!(ext.as_deref(), Some("svg" | "png")) {
                    return Err(kiln::KilnError::Request(format!(
                        "{}: the plot must be a .svg or .png file",
                        path.display()
                    )));
                }
            }
            let model = std::sync::Arc::new(model);
            let draft = draft.map(|path| Model::load(&path, model.gpu.clone(), &mut |_, _| {})).transpose()?;
            let speculative = (lookup || draft.is_some()).then(|| kiln::bench::SpeculativeBench {
                draft: draft.map(std::sync::Arc::new),
                draft_tokens,
                gen_tokens,
            });
            let options = kiln::bench::BenchOptions {
                prompt_tokens,
                gen_tokens,
                fills,
                profile_prefill: !no_prefill_profile,
                concurrency,
                stream_prompt_tokens,
                shared_prefix_tokens: shared_prefix,
                speculative,
            };
            let report = kiln::bench::run(&model, &options, |step| eprintln!("bench: {step}"))?;
            if let Some(path) = &plot {
                kiln::pictures::bench_chart(path, &report)?;
                eprintln!("bench: charts in {}", path.display());
            }
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
        }
    }
    Ok(())
}

/// `kiln attention`: run the prompt once with probes, write a PNG per layer and the JSON.
fn attention(
    args: &ModelArgs,
    prompt: &str,
    layers: Vec<usize>,
    heads: &str,
    out: &std::path::Path,
) -> kiln::Result<()> {
    if prompt.is_empty() {
        return Err(kiln::KilnError::Request("the prompt is empty".into()));
    }
    let model = load(args)?;
    let c = &model.config;
    let layers = if layers.is_empty() { vec![0, c.n_layers - 1] } else { layers };
    let heads: Vec<usize> = if heads == "all" {
        (0..c.n_heads).collect()
    } else {
        let parsed: Result<Vec<usize>, _> = heads.split(',').map(|h| h.trim().parse::<usize>()).collect();
        match parsed {
            Ok(h) if !h.is_empty() && h.iter().all(|&h| h < c.n_heads) => h,
            _ => {
                return Err(kiln::KilnError::Request(format!(
                    "--heads must be `all` or head numbers below {}, got `{heads}`",
                    c.n_heads
                )))
            }
        }
    };
    let ids = model.tokenizer.encode(prompt, true)?;
    let mut session = Session::new(&model, args.ctx)?;
    session.set_adapters(model.weights.lora.all())?;
    let maps = session.attention_maps(&ids, &layers)?;
    std::fs::create_dir_all(out).map_err(|e| kiln::KilnError::io(out, e))?;
    let texts: Vec<String> = ids.iter().map(|&id| model.tokenizer.decode(&[id], false).unwrap_or_default()).collect();
    let labels: Vec<String> = texts.iter().map(|t| kiln::pictures::token_label(t)).collect();
    let group = c.n_heads / c.n_kv_heads;
    let mut json_layers = Vec::new();
    for map in &maps {
        let png = out.join(format!("layer-{}.png", map.layer));
        kiln::pictures::attention_png(&png, map, &heads, group, &labels)?;
        eprintln!("attention: {}", png.display());
        let (t, k) = (map.tokens, map.keys);
        json_layers.push(serde_json::json!({
            "layer": map.layer,
            "heads": heads.iter().map(|&h| serde_json::json!({
                "head": h,
                "kv_head": h / group,
                "probs": (0..t).map(|i| map.probs[(h * t + i) * k..(h * t + i + 1) * k].to_vec()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }));
    }
    let json = serde_json::json!({"prompt": prompt, "token_ids": ids, "tokens": texts, "layers": json_layers});
    let path = out.join("attention.json");
    std::fs::write(&path, json.to_string()).map_err(|e| kiln::KilnError::io(&path, e))?;
    eprintln!("attention: {}", path.display());
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
