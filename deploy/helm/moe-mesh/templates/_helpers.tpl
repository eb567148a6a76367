{{- define "moe-mesh.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moe-mesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "moe-mesh.labels" -}}
app.kubernetes.io/name: {{ include "moe-mesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: router, expert or etcd. */}}
{{- define "moe-mesh.selector" -}}
app.kubernetes.io/name: {{ include "moe-mesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "moe-mesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "moe-mesh.etcd" -}}
{{- if .Values.etcd.bundled.enabled -}}
{{ include "moe-mesh.fullname" . }}-etcd:2379
{{- else -}}
{{ .Values.etcd.endpoints }}
{{- end -}}
{{- end -}}

{{/* The /models volume. */}}
{{- define "moe-mesh.modelVolume" -}}
- name: models
{{- if .Values.model.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
    readOnly: true
{{- else if .Values.model.hostPath }}
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
- name: config
  configMap:
    name: {{ include "moe-mesh.fullname" . }}
{{- if .Values.tls.secretName }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* The TLS settings of a binary's config file, for role `role` (router or expert). */}}
{{- define "moe-mesh.tlsSettings" -}}
{{- if .root.Values.tls.secretName -}}
{{- dict "tls-cert" (printf "/etc/moe-mesh-tls/%s.pem" .role) "tls-key" (printf "/etc/moe-mesh-tls/%s-key.pem" .role) "tls-ca" "/etc/moe-mesh-tls/ca.pem" | toJson -}}
{{- else -}}
{{- dict "insecure" true | toJson -}}
{{- end -}}
{{- end -}}

{{/* A flat TOML table from a dict: whole numbers as integers (YAML gives Helm every number as a float, and an
integer setting refuses 256.0), strings, booleans and lists as JSON, which TOML reads the same. */}}
{{- define "moe-mesh.toml" -}}
{{- range $k, $v := . }}
{{ $k }} = {{ if and (kindIs "float64" $v) (eq (toString $v) (toString (int64 $v))) }}{{ int64 $v }}{{ else }}{{ toJson $v }}{{ end }}
{{- end }}
{{- end -}}
