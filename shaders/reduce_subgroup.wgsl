// Workgroup-wide reductions built on subgroup operations: one subgroup op, then one slot per
// subgroup in shared memory. Interchangeable with reduce_workgroup.wgsl (same functions).
//
// Contract: the including kernel defines `const WG: u32` (its 1-D workgroup size) and calls
// these from uniform control flow with `lid` = local_invocation_index. Every invocation gets
// the result. The subgroup size is read at run time (never assumed: 8 on lavapipe, 32 on
// NVIDIA, 32 or 64 on AMD); subgroups are taken to be runs of consecutive invocation indices,
// which is how every Vulkan, Metal and D3D12 driver forms them for a 1-D workgroup.

const REDUCE_SLOTS: u32 = 64u; // WG / min subgroup size (≥ 4) for WG ≤ 256

var<workgroup> reduce_f: array<vec4<f32>, REDUCE_SLOTS>;
var<workgroup> reduce_u: array<u32, REDUCE_SLOTS>;

fn subgroup_slot(lid: u32) -> u32 {
    return lid / subgroupAdd(1u);
}

fn subgroup_count() -> u32 {
    let size = subgroupAdd(1u);
    return (WG + size - 1u) / size;
}

fn workgroup_sum4(v: vec4<f32>, lid: u32) -> vec4<f32> {
    let s = subgroupAdd(v);
    let n = subgroup_count();
    let slot = subgroup_slot(lid);
    workgroupBarrier(); // the previous reduction's readers are done with the slots
    if subgroupExclusiveAdd(1u) == 0u { // the first active lane
        reduce_f[slot] = s;
    }
    workgroupBarrier();
    var total = vec4<f32>(0.0);
    for (var i = 0u; i < n; i++) {
        total += reduce_f[i];
    }
    return total;
}

fn workgroup_sum(v: f32, lid: u32) -> f32 {
    return workgroup_sum4(vec4<f32>(v, 0.0, 0.0, 0.0), lid).x;
}

fn workgroup_max(v: f32, lid: u32) -> f32 {
    let s = subgroupMax(v);
    let n = subgroup_count();
    let slot = subgroup_slot(lid);
    workgroupBarrier();
    if subgroupExclusiveAdd(1u) == 0u { // the first active lane
        reduce_f[slot].x = s;
    }
    workgroupBarrier();
    var m = reduce_f[0].x;
    for (var i = 1u; i < n; i++) {
        m = max(m, reduce_f[i].x);
    }
    return m;
}

fn workgroup_min_u32(v: u32, lid: u32) -> u32 {
    let s = subgroupMin(v);
    let n = subgroup_count();
    let slot = subgroup_slot(lid);
    workgroupBarrier();
    if subgroupExclusiveAdd(1u) == 0u { // the first active lane
        reduce_u[slot] = s;
    }
    workgroupBarrier();
    var m = reduce_u[0];
    for (var i = 1u; i < n; i++) {
        m = min(m, reduce_u[i]);
    }
    return m;
}
