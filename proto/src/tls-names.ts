/**
 * The name agents verify the head's TLS certificate against, whatever address they dial
 * (a veth, a NAT, a tunnel): gRPC's target name override on the agent, a SAN of the
 * head's certificate only. A bridge certificate from the same CA does not carry it, so
 * a group leader cannot pose as the head. `.invalid` never resolves (RFC 6761).
 */
export const HEAD_TLS_NAME = "head.drover.invalid";
