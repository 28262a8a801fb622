// Workgroup-wide reductions in shared memory only: a tree of log2(WG) steps, a barrier each.
// The fallback for adapters without subgroups; same functions as reduce_subgroup.wgsl.
//
// Contract: the including kernel defines `const WG: u32` (a power of two, ≤ 256) and calls
// these from uniform control flow with `lid` = local_invocation_index. Every invocation gets
// the result.

var<workgroup> reduce_f: array<vec4<f32>, 256>;
var<workgroup> reduce_u: array<u32, 256>;

fn workgroup_sum4(v: vec4<f32>, lid: u32) -> vec4<f32> {
    workgroupBarrier(); // the previous reduction's readers are done with the slots
    reduce_f[lid] = v;
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        workgroupBarrier();
        if lid < stride {
            reduce_f[lid] += reduce_f[lid + stride];
        }
    }
    workgroupBarrier();
    return reduce_f[0];
}

fn workgroup_sum(v: f32, lid: u32) -> f32 {
    return workgroup_sum4(vec4<f32>(v, 0.0, 0.0, 0.0), lid).x;
}

fn workgroup_max(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    reduce_f[lid].x = v;
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        workgroupBarrier();
        if lid < stride {
            reduce_f[lid].x = max(reduce_f[lid].x, reduce_f[lid + stride].x);
        }
    }
    workgroupBarrier();
    return reduce_f[0].x;
}

fn workgroup_min_u32(v: u32, lid: u32) -> u32 {
    workgroupBarrier();
    reduce_u[lid] = v;
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        workgroupBarrier();
        if lid < stride {
            reduce_u[lid] = min(reduce_u[lid], reduce_u[lid + stride]);
        }
    }
    workgroupBarrier();
    return reduce_u[0];
}
