// Embedding lookup: x[t] = table[ids[t]], converting the table's rows (any weights.wgsl type) to f32.
// A table larger than one storage binding is split in row chunks; each chunk's dispatch
// writes only the tokens whose id falls in its rows.

struct Params {
    n_tokens: u32,
    dim: u32,
    first_row: u32,    // first vocabulary row held by this chunk
    rows: u32,         // rows in this chunk
}

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;         // (n_tokens)
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;    // (rows, dim) table, as weights.wgsl stores them
@group(0) @binding(3) var<storage, read_write> x: array<f32>;     // (n_tokens, dim)


@compute @workgroup_size(WG)
fn embedding(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x;
    let id = ids[t];
    if id < p.first_row || id >= p.first_row + p.rows {
        return;
    }
    let src = (id - p.first_row) * p.dim;
    for (var i = lid; i < p.dim; i += WG) {
        x[t * p.dim + i] = weight_at(src + i);
    }
}

// Row gather of activations: out[i] = src[ids[i]] (the rows of a batched step whose logits are
// wanted: each sequence's last token). Same params; `rows` is src's row count.
@group(0) @binding(4) var<storage, read> src: array<f32>;         // (rows, dim)

@compute @workgroup_size(WG)
fn gather_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x;
    let row = ids[t];
    if row >= p.rows {
        return;
    }
    for (var i = lid; i < p.dim; i += WG) {
        x[t * p.dim + i] = src[row * p.dim + i];
    }
}
