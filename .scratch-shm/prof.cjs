const fs=require('fs'); const f=fs.readdirSync('.').find(x=>x.endsWith('.cpuprofile')); const p=JSON.parse(fs.readFileSync(f));
const byId=new Map(p.nodes.map(n=>[n.id,n])); const parent=new Map(); for(const n of p.nodes) for(const c of (n.children||[])) parent.set(c,n.id);
const name=id=>{const n=byId.get(id);return n.callFrame.functionName+' '+n.callFrame.url.split('/').slice(-2).join('/')+':'+n.callFrame.lineNumber};
const self=new Map(), total=new Map(); let win=0;
p.samples.forEach((s,i)=>{const dt=p.timeDeltas[i+1]||0; const chain=[]; let id=s; while(id!==undefined){chain.push(id); id=parent.get(id);} if(!chain.some(c=>byId.get(c).callFrame.functionName==='THE_READ_WINDOW')) return; win+=dt; self.set(name(s),(self.get(name(s))||0)+dt); for(const k of new Set(chain.map(name))) total.set(k,(total.get(k)||0)+dt);});
console.log('window ms', win/1000);
console.log('--self'); [...self].sort((a,b)=>b[1]-a[1]).slice(0,8).forEach(([k,t])=>console.log((t/1000).toFixed(2),k));
